"""wren: run, compress and fine-tune Gemma-family models on one ordinary machine.

    model = wren.load()                       # the embedded default model, or a folder / .gguf path
    wren.generate(model, "Why is the sky blue?", temperature=0)
    for piece in wren.stream(model, [{"role": "user", "content": "Hi"}]): print(piece, end="")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import WrenError  # noqa: E402


def load(source=None, *, dtype=None, device="cpu", int8=False, in_place=False):
    """A model from an HF folder, a .gguf file, or None for the default; call it on [B, T] ids for logits.
    `int8=True` runs a GGUF's quantized weights on the CPU as int8 levels: several times faster decoding,
    ~0.8% from the exact weights (what `wren run` and `wren serve` do). With `in_place=True` too, the linear
    layers' blocks are read as the file stores them (`--low-memory`): the GGUF's own footprint."""
    import torch

    from .weights.load import load as _load

    return _load(source, dtype=dtype or torch.float32, device=device, int8=int8, in_place=in_place)


def stream(model, prompt, *, system=None, raw=False, think=False, **options):
    """Yield the reply to a prompt string or a list of chat messages, piece by piece."""
    from .generation import stream_text
    from .sampling import Options

    yield from stream_text(model, prompt, Options.from_dict(options), system=system, raw=raw, think=think)


def generate(model, prompt, **kwargs) -> str:
    """The whole reply to a prompt string or a list of chat messages (see `stream` for the options)."""
    return "".join(stream(model, prompt, **kwargs))


__all__ = ["load", "stream", "generate", "WrenError", "__version__"]
