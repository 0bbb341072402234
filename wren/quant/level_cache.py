"""The CPU fast path's int8 levels of a TurboQuant folder, written to disk once and memory-mapped after.

Building the levels (cpu_kernels.int8_levels) decodes every weight: a second or more for the default
model, paid at the first forward of every process, and the levels then sit in anonymous memory beside the
codes they came from. Kept under $WREN_CACHE/levels/ (default ~/.cache/wren/levels/; $WREN_LEVEL_CACHE
moves them), a later load maps them instead: nothing is decoded, and the codes' pages are never touched
on the CPU (the embedding reads only the rows of the tokens it sees), so resident memory holds the levels
alone, as clean file pages. Weights the compiled kernels read straight from their codes (up to 6 bits, on a
CPU with AVX-512 VBMI: native.CodesWeight) get no levels: there the codes are what stays resident.

The cache is keyed by the folder's path and its safetensors files' sizes and mtimes, so a rewritten folder
gets new levels; the newest KEEP caches are kept. Any failure (a read-only home, a full disk, a corrupt
cache file) falls back to building the levels in memory, as without the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import WrenError
from ..weights.safetensors import SafetensorsFile
from . import cpu_kernels
from .cpu_kernels import release_free_memory
from .linear import TQWeight

FORMAT = 1  # bump when int8_levels changes what it computes
KEEP = 4
ALIGN = 64
DTYPE_NAMES = {torch.int8: "I8", torch.bfloat16: "BF16"}


def cache_root() -> Path:
    if os.environ.get("WREN_LEVEL_CACHE"):
        return Path(os.environ["WREN_LEVEL_CACHE"])
    return Path(os.environ.get("WREN_CACHE", Path.home() / ".cache" / "wren")) / "levels"


def cache_key(folder: Path) -> str:
    h = hashlib.sha256(f"{FORMAT}:{folder.resolve()}".encode())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def fast_modules(model) -> dict[str, TQWeight]:
    """The modules whose CPU matmul runs on int8 levels: the Hadamard-rotated TurboQuant weights, but for
    those the compiled kernels read straight from their codes (no levels are built or mapped for them)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, TQWeight) and m.cfg.rotation == "hadamard" and not m.reads_codes()}


def attach(model, folder: Path) -> None:
    """Give every fast module of `model` (loaded on the CPU from `folder`) its levels from the cache,
    writing the cache first if it is missing."""
    modules = fast_modules(model)
    if not modules:
        return
    path = cache_root() / f"{cache_key(folder)}.safetensors"
    try:
        open_or_write(path, lambda: _map(path, modules), lambda: _write(path, modules))
    except CACHE_ERRORS:  # unwritable or unreadable: build in memory when first needed
        for m in modules.values():
            m._int8 = None


CACHE_ERRORS = (OSError, WrenError, KeyError)  # what a missing, corrupt or unwritable cache file raises


def open_or_write(path: Path, open_, write):
    """open_() the cache file at `path`; if it is missing or corrupt, write() it first (once). Either way it
    becomes the most recently used, and the oldest past KEEP are removed. Raises CACHE_ERRORS where it can
    be neither opened nor written."""
    try:
        opened = open_()
    except CACHE_ERRORS:
        path.unlink(missing_ok=True)
        write()
        opened = open_()
    os.utime(path)  # most recently used: pruned last
    prune(path.parent)
    return opened


def write_file(path: Path, items, need: int) -> None:
    """Write a cache file of `items` (as `write_aligned` takes them, about `need` bytes) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < 2 * need:  # leave the disk at least as much again
        raise OSError(f"{need} bytes of levels would nearly fill {path.parent}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            write_aligned(f, items)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    release_free_memory()


def _write(path: Path, modules: dict[str, TQWeight]) -> None:
    """The cache file, each weight's levels made a piece at a time as they are written (its scales follow),
    so that writing holds neither every weight's levels nor one whole weight's."""
    items = []
    for name, m in modules.items():
        scales = torch.empty(m.out_features, dtype=torch.bfloat16)
        items += [(f"{name}.levels", torch.int8, (m.out_features, m.in_features),
                   lambda m=m, scales=scales: _level_pieces(m, scales)),
                  (f"{name}.scales", torch.bfloat16, (m.out_features,), lambda scales=scales: scales)]
    need = sum(m.out_features * (m.in_features + 2) for m in modules.values())
    write_file(path, items, need)
    for m in modules.values():  # the mapped copies replace any built before
        m._int8 = None


def _level_pieces(m: TQWeight, scales: torch.Tensor):
    """The levels of `m` in pieces of rows (the ones it holds already, if built), filling `scales` as it goes."""
    if m._int8 is not None:
        scales.copy_(m._int8[1])
        yield m._int8[0]
        return
    for start, levels, piece_scales in cpu_kernels.int8_level_pieces(m.codes, m.scales, m.cfg, m.in_features):
        scales[start:start + levels.shape[0]] = piece_scales
        yield levels


def write_aligned(f, items) -> None:
    """A safetensors file whose every tensor starts ALIGN bytes into a page (padding tensors fill the
    gaps): PyTorch's int8 kernel crashes on levels that are only 8-byte aligned, as plain safetensors
    offsets may be. `items` are (name, dtype, shape, make): the header is written first, then each tensor
    as `make()` returns it (a tensor, or an iterable of pieces of its rows), one at a time, so a writer never
    holds more than one."""
    entries, offset = {}, 0
    layout = []  # (padding before, name, dtype, shape, make)
    for name, dtype, shape, make in items:
        pad = -offset % ALIGN
        if pad:
            entries[f"__pad{len(layout)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            offset += pad
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        layout.append((pad, name, dtype, shape, make))
    header = json.dumps(entries).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    f.write(len(header).to_bytes(8, "little"))
    f.write(header)
    for pad, name, dtype, shape, make in layout:
        f.write(bytes(pad))
        made = make()
        pieces = [made] if isinstance(made, torch.Tensor) else made  # or an iterable of pieces of rows
        rows = 0
        for t in pieces:
            if t.dtype != dtype or t.dim() != len(shape) or tuple(t.shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"{name}: made {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            rows += t.shape[0]
        if rows != shape[0]:
            raise ValueError(f"{name}: made {rows} rows, the header says {tuple(shape)}")


def _map(path: Path, modules: dict[str, TQWeight]) -> None:
    f = SafetensorsFile(path)
    for name, m in modules.items():
        levels, scales = f.tensor(f"{name}.levels"), f.tensor(f"{name}.scales")
        if levels.shape != (m.out_features, m.in_features) or scales.shape != (m.out_features,):
            raise KeyError(f"{name}: cached levels of the wrong shape")
        if levels.data_ptr() % ALIGN or scales.data_ptr() % ALIGN:
            raise KeyError(f"{name}: cached levels not {ALIGN}-byte aligned")
        m._int8 = (levels, scales)


def prune(root: Path) -> None:
    caches = sorted(root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in caches[KEEP:]:
        old.unlink(missing_ok=True)
