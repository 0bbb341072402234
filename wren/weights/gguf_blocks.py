"""The linear layers of a GGUF read in place (`quant/blocks.py`), where the compiled kernels read their type.

`wren run`, `wren serve` and `wren bench` load a GGUF this way on the CPU: each nn.Linear whose GGUF type is
one of native.IN_PLACE_TYPES becomes a `BlocksLinear` over the file's own bytes (mapped, not copied, not
converted). A tied embedding (the LM head) is read in place too where its type takes fewer than 8 bits a
weight (a Q6_K or Q4_0 token_embd): a `BlocksEmbedding`, no level copy of the largest matrix of the model in
memory or on disk. A Q8_0 one (8.5 bits; llama.cpp's quantizer writes Gemma's tied head so) stays int8 levels
(`gguf_levels.py`), smaller and the fastest kernel the CPU has; so do the layers of any other block type, and
every layer where the kernels do not run.
"""

from __future__ import annotations

from torch import nn

from .. import native
from ..quant.blocks import BlocksEmbedding, BlocksLinear, as_tensor
from . import gguf_levels
from .gguf_quants import tensor_nbytes


def choose(model, infos: dict) -> dict:
    """module name -> GGUF tensor info of the linear layers to read in place, and of a tied embedding stored
    in under 8 bits a weight."""
    if not native.blocks_readable():
        return {}
    tied = getattr(model, "lm_head", 0) is None
    chosen = {}
    for name, module in model.named_modules():
        info = infos.get(f"{name}.weight")
        if info is None or len(info.shape) != 2 or info.ggml_type not in native.IN_PLACE_TYPES:
            continue
        head = tied and name == "embed_tokens" and isinstance(module, nn.Embedding)
        if isinstance(module, nn.Linear) or (head and _bits_per_weight(info) < 8):
            chosen[name] = info
    return chosen


def _bits_per_weight(info) -> float:
    return tensor_nbytes(info.ggml_type, info.shape) * 8 / (info.shape[0] * info.shape[1])


def install(model, chosen: dict) -> None:
    """Swap the chosen modules (on the meta device) for empty block modules that load by name."""
    for name, info in chosen.items():
        rows, width = info.shape
        row_bytes = tensor_nbytes(info.ggml_type, info.shape) // rows
        kind = BlocksEmbedding if isinstance(model.get_submodule(name), nn.Embedding) else BlocksLinear
        gguf_levels.swap_in(model, name, lambda _: kind(rows, width, info.ggml_type, row_bytes))


def tensors(gf, chosen: dict) -> dict:
    """state-dict name -> (shape, getter) of every chosen module's blocks: views of the mapped file."""
    out = {}
    for name, info in chosen.items():
        rows = info.shape[0]
        shape = (rows, tensor_nbytes(info.ggml_type, info.shape) // rows)
        out[f"{name}.blocks"] = (shape, lambda info=info, rows=rows: as_tensor(gf.raw(info.name), rows))
    return out
