"""A GGUF's quantized weights as int8 levels (`quant/levels.py`), converted once and kept on disk.

`wren run`, `wren serve` and `wren bench` load a GGUF this way on the CPU (`load(..., int8=True)`). The
linear layers and the tied LM head whose GGUF type is a block format become `LevelsLinear` /
`LevelsEmbedding`; dense-typed (F32, F16, BF16) weights stay exact.

Converting dequantizes every weight and rotates it, in one compiled pass where the CPU runs the block kernels
(the default model's first load: 1.4 s, against 2.7 s in PyTorch). The levels are written to the level cache
(`level_cache.cache_root()`, keyed by the GGUF's inode, size and mtime: `file_identity`, so its hard links in
the model store share it) and mapped by later loads, which then never dequantize nor read the GGUF's weights:
resident memory holds the levels the kernels read, as clean file pages. The tied embedding's lookups still
read the GGUF's own rows, exactly (a `RowTable`). A cache that cannot be written (a read-only home, a full
disk) falls back to converting in memory at every load; a corrupt or mismatched one is written again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .. import native
from ..quant import level_cache
from ..quant.blocks import as_tensor
from ..quant.levels import GROUP, SEED, LevelsEmbedding, LevelsLinear, convertible, rows_per_chunk, to_levels
from . import file_identity
from .gguf_quants import QT, dequantize
from .safetensors import SafetensorsFile
from .tables import RowTable

FORMAT = 1  # bump when to_levels changes what it computes
_DENSE_TYPES = {QT.F32, QT.F16, QT.BF16}


def choose(model, infos: dict) -> dict:
    """module name -> GGUF tensor info of the weights to hold as levels: the linear layers, and a tied
    embedding (the LM head), stored in a block format, of a width GROUP divides."""
    tied = getattr(model, "lm_head", 0) is None
    chosen = {}
    for name, module in model.named_modules():
        info = infos.get(f"{name}.weight")
        if info is None or info.ggml_type in _DENSE_TYPES or not convertible(info.shape):
            continue
        if isinstance(module, nn.Linear) or (tied and name == "embed_tokens" and isinstance(module, nn.Embedding)):
            chosen[name] = info
    return chosen


def swap_in(model, name: str, make) -> None:
    """Replace the module `name` of a model (on the meta device) with make(the module)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, make(getattr(parent, child)))


def install(model, chosen: dict) -> None:
    """Swap the chosen modules (on the meta device) for empty level modules that load by name."""
    for name, info in chosen.items():
        kind = LevelsEmbedding if isinstance(model.get_submodule(name), nn.Embedding) else LevelsLinear
        swap_in(model, name, lambda _: kind(*info.shape, seed=SEED))


def attach_rows(model, gf, chosen: dict) -> None:
    """After loading: a tied embedding held as levels or blocks looks its rows up in the GGUF's own bytes (exact)."""
    info = chosen.get("embed_tokens")
    if info is not None:
        model.embed_tokens.source_rows = RowTable(*info.shape, raw=gf.raw(info.name), ggml_type=info.ggml_type)


def tensors(path: Path, gf, chosen: dict) -> dict:
    """state-dict name -> (shape, getter) of every chosen module's levels and row scales: mapped from the
    cache (written first if missing), or converted in memory where the cache cannot be used."""
    if not chosen:
        return {}
    cache = level_cache.cache_root() / f"gguf-{_key(path)}.safetensors"
    try:
        mapped = level_cache.open_or_write(cache, lambda: _open(cache, chosen), lambda: _write(cache, gf, chosen))
    except level_cache.CACHE_ERRORS:
        return _in_memory(gf, chosen)
    out = {}
    for name, info in chosen.items():
        for part, shape in (("levels", info.shape), ("row_scales", info.shape[:1])):
            out[f"{name}.{part}"] = (shape, lambda n=f"{name}.{part}": mapped.tensor(n))
    return out


def _key(path: Path) -> str:
    return hashlib.sha256(f"{FORMAT}:{GROUP}:{SEED}:{file_identity(path)}".encode()).hexdigest()[:32]


def convert(gf, info) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels and row scales of one GGUF tensor: in one compiled pass where the block kernels run (bit for
    bit the same, ~0.7 ns a weight on 2 threads: the default model's tensors in 0.3 s against 1.4 s), else
    dequantized and rotated in PyTorch a slice of rows at a time."""
    rows, width = info.shape
    raw = gf.raw(info.name).reshape(rows, -1)
    if info.ggml_type in native.IN_PLACE_TYPES and native.blocks_readable():
        levels, scales = native.blocks_to_levels(as_tensor(raw, rows), info.ggml_type, width, GROUP, SEED)
        gf.release(info.name)
        return levels, scales
    levels = torch.empty(rows, width, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.bfloat16)
    step = rows_per_chunk(width)
    for start in range(0, rows, step):
        part = raw[start:start + step]
        w = dequantize(part.reshape(-1), info.ggml_type, (part.shape[0], width))
        levels[start:start + step], scales[start:start + step] = to_levels(w)
    gf.release(info.name)
    return levels, scales


def _in_memory(gf, chosen: dict) -> dict:
    out = {}
    for name, info in chosen.items():
        levels, scales = convert(gf, info)
        out[f"{name}.levels"] = (info.shape, lambda t=levels: t)
        out[f"{name}.row_scales"] = (info.shape[:1], lambda t=scales: t)
    return out


def _write(path: Path, gf, chosen: dict) -> None:
    """The cache file, converted a tensor at a time as it is written (each tensor's scales follow its levels)."""
    held = {}

    def levels_of(info):
        levels, held["scales"] = convert(gf, info)
        return levels

    items = []
    for name, info in chosen.items():
        items.append((f"{name}.levels", torch.int8, tuple(info.shape), lambda info=info: levels_of(info)))
        items.append((f"{name}.row_scales", torch.bfloat16, tuple(info.shape[:1]), lambda: held.pop("scales")))
    level_cache.write_file(path, items, sum(info.shape[0] * (info.shape[1] + 2) for info in chosen.values()))


def _open(path: Path, chosen: dict) -> SafetensorsFile:
    """The mapped cache, checked to hold every chosen tensor in its shape, type and alignment."""
    f = SafetensorsFile(path)
    for name, info in chosen.items():
        for part, shape, dtype in (("levels", info.shape, torch.int8), ("row_scales", info.shape[:1], torch.bfloat16)):
            t = f.tensor(f"{name}.{part}")
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.data_ptr() % level_cache.ALIGN:
                raise KeyError(f"{name}.{part}: cached levels of the wrong shape, type or alignment")
    return f
