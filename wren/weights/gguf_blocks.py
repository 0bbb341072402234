"""The linear layers of a GGUF read in place (`quant/blocks.py`), where the compiled kernels read their type.

`wren run`, `wren serve` and `wren bench` load a GGUF this way on the CPU: each nn.Linear whose GGUF type is
one of native.IN_PLACE_TYPES becomes a `BlocksLinear` over the file's own bytes (mapped, not copied, not
converted). The tied embedding, the LM head of small models and the largest matmul of their decode step,
stays int8 levels (`gguf_levels.py`), whose kernel is the fastest the CPU has; so do the layers of any other
block type, and every layer where the kernels do not run.
"""

from __future__ import annotations

from torch import nn

from .. import native
from ..quant.blocks import BlocksLinear, as_tensor
from . import gguf_levels
from .gguf_quants import tensor_nbytes


def choose(model, infos: dict) -> dict:
    """module name -> GGUF tensor info of the linear layers to read in place."""
    if not native.blocks_readable():
        return {}
    chosen = {}
    for name, module in model.named_modules():
        info = infos.get(f"{name}.weight")
        if (info is not None and isinstance(module, nn.Linear) and len(info.shape) == 2
                and info.ggml_type in native.IN_PLACE_TYPES):
            chosen[name] = info
    return chosen


def install(model, chosen: dict) -> None:
    """Swap the chosen modules (on the meta device) for empty block modules that load by name."""
    for name, info in chosen.items():
        rows, width = info.shape
        row_bytes = tensor_nbytes(info.ggml_type, info.shape) // rows
        gguf_levels.swap_in(model, name, lambda _: BlocksLinear(rows, width, info.ggml_type, row_bytes))


def tensors(gf, chosen: dict) -> dict:
    """state-dict name -> (shape, getter) of every chosen module's blocks: views of the mapped file."""
    out = {}
    for name, info in chosen.items():
        rows = info.shape[0]
        shape = (rows, tensor_nbytes(info.ggml_type, info.shape) // rows)
        out[f"{name}.blocks"] = (shape, lambda info=info, rows=rows: as_tensor(gf.raw(info.name), rows))
    return out
