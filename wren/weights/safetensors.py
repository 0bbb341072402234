"""Read safetensors files through a memory map, checking every header field before trusting it.

Tensors are zero-copy views of the mapped file (a private copy-on-write map, so nothing ever writes back).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import torch

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise ModelFormatError(f"{self.path} is too short to be a safetensors file (truncated?)")
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > min(MAX_HEADER, size - 8):
                    raise ModelFormatError(f"{self.path}: header length {header_len} exceeds the file (truncated or corrupt)")
                raw = f.read(header_len)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{self.path} does not exist") from None
        except IsADirectoryError:
            raise ModelFormatError(f"{self.path} is a directory, not a safetensors file") from None
        except OSError as exc:
            raise ModelNotFoundError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        header = json_object(raw, f"{self.path}: header")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise ModelFormatError(f"{self.path}: __metadata__ must map names to strings (corrupt header)")
        self.data_start = 8 + header_len
        self.entries = {name: self._check(name, e, size - self.data_start) for name, e in header.items()}
        # Tensors sharing bytes would let a small file pose as a huge model; see GGUFFile.
        spans = sorted((begin, begin + math.prod(shape) * dtype.itemsize, name)
                       for name, (dtype, shape, begin) in self.entries.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ModelFormatError(f"{self.path}: tensors {a!r} and {b!r} overlap (corrupt)")

    def _check(self, name: str, entry, data_size: int):
        bad = f"{self.path}: tensor {name!r} has a corrupt header entry"
        if not isinstance(entry, dict):
            raise ModelFormatError(bad)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise ModelFormatError(f"{bad}: dtype {dtype!r}")
        if dtype not in DTYPES:
            raise UnsupportedModelError(f"{self.path}: tensor {name!r} has dtype {dtype!r}, which wren does not "
                                        f"read (it reads {', '.join(DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise ModelFormatError(f"{bad}: shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ModelFormatError(f"{bad}: data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise ModelFormatError(f"{bad}: its bytes [{begin}, {end}) do not fit the file or the shape "
                                   "(truncated or corrupt)")
        return DTYPES[dtype], tuple(shape), begin

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self.data_start + begin)
        return flat.view(shape)


def json_object(raw: bytes, what: str) -> dict:
    """Parse JSON that must be an object; any failure is a ModelFormatError naming `what`."""
    try:
        value = json.loads(raw)
    except ValueError as exc:  # also bad UTF-8 and over-long integers
        raise ModelFormatError(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ModelFormatError(f"{what} is JSON nested too deeply to be real (corrupt)") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{what} is not a JSON object")
    return value


def open_checkpoint(folder: Path) -> dict[str, SafetensorsFile]:
    """Map every tensor name of a (possibly sharded) HF checkpoint folder to the file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json_object(index.read_bytes(), str(index)).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise ModelFormatError(f"{index} is not a valid safetensors index: its weight_map must map "
                                   "tensor names to shard file names")
        files = [folder / s for s in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} holds no *.safetensors weights")
    by_name: dict[str, SafetensorsFile] = {}
    for path in files:
        if path.parent.resolve() != folder.resolve():
            raise ModelFormatError(f"{index}: shard {path.name!r} points outside the model folder")
        st = SafetensorsFile(path)
        for name in st.keys():
            by_name[name] = st
    return by_name
