"""Rows of a memory-mapped table, read from its file with pread so that a lookup maps no page.

An embedding lookup through the mapping faults in each row's page, and Linux maps up to 16 neighbouring pages
that are already in the page cache along with it (fault-around; madvise(MADV_RANDOM) does not stop it). A
2,048-token prompt so left 73 MB of the default model's 160 MB embedding codes resident for the ~1,500 rows
it used. pread copies just the rows' bytes out of the page cache, which counts against no process.

Tables that are not a file's mapping (made in memory, on a GPU), lookups of most of a table, and systems
without /proc fall back to indexing the tensor."""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch

from ..errors import ModelFormatError

PREAD_MAX_SHARE = 8  # a lookup of more than rows / 8 ids indexes the mapping: it would touch most pages anyway

_lock = threading.Lock()
_sources: dict[int, tuple[int, int] | None] = {}  # id(table) -> (fd, offset) or None, while the table lives


def _mapping(addr: int) -> tuple[int, int, int, int, str] | None:
    """(start, file offset, device, inode, path) of the file mapping holding `addr`, or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if start <= addr < end:
                    if len(parts) < 6 or int(parts[4]) == 0 or not parts[5].startswith("/"):
                        return None  # anonymous memory
                    major, minor = (int(x, 16) for x in parts[3].split(":"))
                    return start, int(parts[2], 16), os.makedev(major, minor), int(parts[4]), parts[5].rstrip("\n")
    except (OSError, ValueError):
        pass
    return None


def _open(device: int, inode: int, path: str) -> int | None:
    """A read-only fd of the mapped file, or None where `path` no longer names it (replaced or deleted)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (device, inode):
        os.close(fd)
        return None
    return fd


def _find_source(table: torch.Tensor) -> tuple[int, int] | None:
    if table.device.type != "cpu" or table.dim() < 1 or not table[:1].is_contiguous() or not hasattr(os, "preadv"):
        return None
    found = _mapping(table.data_ptr())
    if found is None:
        return None
    start, offset, device, inode, path = found
    fd = _open(device, inode, path)
    return None if fd is None else (fd, offset + table.data_ptr() - start)


def _source(table: torch.Tensor) -> tuple[int, int] | None:
    """(fd, file offset of row 0) where `table` maps a file with contiguous rows, else None. Found once per
    tensor (the maps file is read once, not every decode step). The table is taken to be read-only: a page
    written through a private mapping would differ from the file."""
    key = id(table)  # not the tensor: a dict would compare tensors with ==, element by element
    with _lock:  # held while the maps file is read, once per table
        if key not in _sources:
            _sources[key] = _find_source(table)
            # the entry and its fd live as long as the table (so an id is never reused while listed, and a
            # removed model's file is freed)
            weakref.finalize(table, _forget, key)
        return _sources[key]


def _forget(key: int) -> None:
    with _lock:
        found = _sources.pop(key, None)
    if found is not None:
        os.close(found[0])


def take_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] for 1-D integer ids (checked to lie in the table): rows of a mapped file read with pread."""
    rows = table.shape[0] if table.dim() else 0
    few = 0 < ids.numel() <= max(1, rows // PREAD_MAX_SHARE)
    source = _source(table) if few and table.device.type == "cpu" and ids.device.type == "cpu" else None
    if source is None:
        return table[ids]
    unique, inverse = np.unique(ids.numpy(), return_inverse=True)
    if unique[0] < 0 or unique[-1] >= rows:
        raise IndexError(f"row id outside the table's {rows} rows")
    fd, base = source
    pitch = table.stride(0) * table.element_size()
    row_bytes = table[0].numel() * table.element_size()
    out = np.empty((len(unique), row_bytes), dtype=np.uint8)
    for i, r in enumerate(unique.tolist()):
        if os.preadv(fd, [out[i]], base + r * pitch) != row_bytes:
            raise ModelFormatError("the model file was truncated while it was loaded")
    picked = torch.from_numpy(out).view(table.dtype).view(len(unique), *table.shape[1:])
    return picked[torch.from_numpy(inverse.reshape(-1))]
