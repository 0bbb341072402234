"""Hostile model files: truncated, bit-flipped, absurd or self-contradictory GGUF / safetensors / config.json
files must make `wren.load` raise a WrenError -- never another exception, a hang or a multi-GB allocation.

Targeted cases first (each names the field it breaks), then property-based fuzzing: valid tiny files with
random, structure-aware mutations (header fields overwritten with extreme integers, bytes flipped, inserted
or deleted, files truncated, JSON fields replaced). A mutated file that still loads must also run a forward.

Every load runs under `bounded()`: RLIMIT_DATA set to the current data size + 1 GiB, so a multi-GB
allocation fails loudly (torch/numpy raise, which is not a WrenError) instead of swapping, and SIGALRM
turns a hang into an exception. In-process rather than in a subprocess per case (thousands of torch
imports); RLIMIT_DATA rather than RLIMIT_AS because torch reserves large address ranges it never touches;
only the soft limit is lowered, and it is restored after each load.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import struct
import sys
import time

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wren
from gguf_writer import write_gguf
from wren.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError, WrenError
from wren.weights.gguf import GGUFFile
from wren.weights.safetensors import DTYPES, SafetensorsFile

Q8_0, F16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
# 8 x 500 fuzz cases in ~30 s on 2 cores; WREN_FUZZ_EXAMPLES=5000 for a deeper search. Under CI the cases
# are the same every run (derandomize) so a landing is judged on code, not luck; elsewhere each run
# explores new cases.
FUZZ = settings(max_examples=int(os.environ.get("WREN_FUZZ_EXAMPLES", 500)), deadline=None, database=None,
                derandomize=bool(os.environ.get("CI")), suppress_health_check=[HealthCheck.too_slow])


# --- guards -------------------------------------------------------------------------------------------------

class Hang(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: int = 20, headroom: int = 1 << 30):
    """Fail on an allocation of more than `headroom` bytes in all, or on a run longer than `seconds`
    (the memory cap on Linux only, the time limit where there is SIGALRM)."""
    with contextlib.ExitStack() as stack:
        if sys.platform.startswith("linux"):
            import resource

            with open("/proc/self/status") as f:
                in_use = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
            soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
            cap = in_use + headroom if hard == resource.RLIM_INFINITY else min(in_use + headroom, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
            stack.callback(resource.setrlimit, resource.RLIMIT_DATA, (soft, hard))
        if hasattr(signal, "SIGALRM"):
            def alarm(*_):
                raise Hang(f"still loading after {seconds} s")

            stack.callback(signal.signal, signal.SIGALRM, signal.signal(signal.SIGALRM, alarm))
            signal.alarm(seconds)
            stack.callback(signal.alarm, 0)
        yield


def _log(line: str) -> None:
    """HOSTILE_LOG=file collects each fuzz case's outcome, to check what the mutations reach."""
    if os.environ.get("HOSTILE_LOG"):
        with open(os.environ["HOSTILE_LOG"], "a") as f:
            f.write(line[:160].replace("\n", " ") + "\n")


def load_or_wren_error(path):
    """Load `path` and run a tiny forward. Returns the exception if it was a WrenError (anything else
    propagates and fails the test), or None if the file loaded and ran."""
    start = time.perf_counter()
    with bounded():
        try:
            model = wren.load(path)
            ids = torch.tensor([[0, 1, 2]]) % model.config.vocab_size
            logits = model(ids)  # NaN from corrupt float data is fine; only a crash is a bug
        except WrenError as exc:
            assert str(exc), "a WrenError must say what went wrong"
            _log(f"{time.perf_counter() - start:.3f}s {type(exc).__name__}: {str(exc).replace(str(path), 'PATH')}")
            return exc
    _log(f"{time.perf_counter() - start:.3f}s LOADED")
    assert logits.shape == (1, 3, model.config.vocab_size)
    return None


def expect(path, error=WrenError, match=None):
    with bounded(), pytest.raises(error, match=match):
        model = wren.load(path)
        model(torch.tensor([[0, 1, 2]]))


# --- building files -----------------------------------------------------------------------------------------

_NP_TYPES = {np.dtype(k): v for k, v in {"u1": 0, "i1": 1, "u2": 2, "i2": 3, "u4": 4, "i4": 5, "f4": 6,
                                          "bool": 7, "u8": 10, "i8": 11, "f8": 12}.items()}


def _gguf_str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<Iq", 11, v) if -(1 << 63) <= v < 1 << 63 else struct.pack("<IQ", 10, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _gguf_str(v)
    if isinstance(v, np.ndarray):
        return struct.pack("<IIQ", 9, _NP_TYPES[v.dtype.newbyteorder("=")], v.size) + v.tobytes()
    if isinstance(v, list):  # of strings
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_gguf_str(s) for s in v)
    raise TypeError(v)


def encode_gguf(meta: dict, tensors: list, data: bytes, *, version: int = 3, alignment: int = 32) -> bytes:
    """A GGUF file. tensors: (name, shape in numpy order, ggml type, offset into data)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta)))
    for key, value in meta.items():
        out += _gguf_str(key) + _gguf_value(value)
    for name, shape, ggml_type, offset in tensors:
        out += _gguf_str(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *reversed(shape))
        out += struct.pack("<IQ", ggml_type, offset)
    out += bytes(-len(out) % alignment)
    return bytes(out + data)


def decode_gguf(path):
    """(metadata, tensors, data) of a valid GGUF, ready to be edited and encoded again."""
    gf = GGUFFile(path)
    tensors = [(i.name, i.shape, i.ggml_type, i.offset - gf.data_start) for i in gf.tensors.values()]
    return dict(gf.metadata), tensors, bytes(gf._map[gf.data_start:])


def gguf_fields(data: bytes):
    """(offset, size) of every integer or scalar field of a GGUF header -- counts, string lengths, value
    types, array counts, dims, tensor types and offsets, scalar metadata values -- and the header's end."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fields, pos = [], 0

    def take(size):
        nonlocal pos
        fields.append((pos, size))
        pos += size
        return int.from_bytes(data[pos - size:pos], "little")

    def skip_string():
        nonlocal pos
        length = take(8)  # (not `pos += take(8)`: that reads pos before take moves it)
        pos += length

    pos = 4
    take(4)
    n_tensors, n_kv = take(8), take(8)
    for _ in range(n_kv):
        skip_string()
        vtype = take(4)
        if vtype == 8:
            skip_string()
        elif vtype == 9:
            etype, count = take(4), take(8)
            for i in range(count):
                if etype == 8:
                    skip_string()
                    if i > 1:  # keep the lengths of the first two strings only: they are all alike
                        fields.pop()
                else:
                    pos += sizes[etype]
        else:
            take(sizes[vtype])
    for _ in range(n_tensors):
        skip_string()
        for _ in range(take(4)):
            take(8)
        take(4), take(8)
    return fields, pos


def encode_safetensors(header: dict, data: bytes, header_bytes: bytes | None = None) -> bytes:
    raw = json.dumps(header).encode() if header_bytes is None else header_bytes
    return struct.pack("<Q", len(raw)) + raw + data


def decode_safetensors(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


class Files:
    """Valid tiny files to start from, and scratch paths for their mutants."""

    def __init__(self, tiny, root):
        self.root, self._n = root, itertools.count()
        hf3, self.hf3, self.g3 = tiny["gemma3"]
        hf4, self.hf4, self.g4 = tiny["gemma4-e2b"]
        _, self.moe, _ = tiny["gemma4-26b"]
        self.g3q8, self.g4f16 = root / "g3q8.gguf", root / "g4f16.gguf"
        write_gguf(hf3, self.g3q8, "gemma3", tensor_type=Q8_0)
        write_gguf(hf4, self.g4f16, "gemma4", tensor_type=F16)

    def __repr__(self):  # Hypothesis prints the arguments of a failing case
        return "Files()"

    def path(self, suffix=".gguf"):
        return self.root / f"case{next(self._n)}{suffix}"

    def write(self, raw: bytes, suffix=".gguf"):
        path = self.path(suffix)
        path.write_bytes(raw)
        return path

    def folder(self, src, *, config=None, safetensors: bytes | None = None, extra: dict | None = None):
        """A copy of HF folder `src` (weights hard-linked) with some files replaced."""
        dst = self.path("")
        dst.mkdir()
        for name in ("config.json", "model.safetensors"):
            os.link(src / name, dst / name)
        if config is not None:
            (dst / "config.json").unlink()
            (dst / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
        if safetensors is not None:
            (dst / "model.safetensors").unlink()
            (dst / "model.safetensors").write_bytes(safetensors)
        for name, content in (extra or {}).items():
            (dst / name).write_bytes(content)
        return dst

    def config(self, src) -> dict:
        return json.loads((src / "config.json").read_text())


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    return Files(tiny, tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny loads: extra intra-op threads only spin, and with the cores busy (other test runs
    alongside) they made the fuzzing 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory cap uses Linux's RLIMIT_DATA")
def test_guards_catch_big_allocations_and_hangs():
    with pytest.raises((MemoryError, RuntimeError), match="alloc"), bounded():
        torch.ones(1 << 29)  # 2 GiB
    with pytest.raises(MemoryError), bounded():
        np.ones(1 << 29)
    with pytest.raises(Hang), bounded(seconds=1):
        time.sleep(5)
    torch.ones(1 << 29)  # and the limits are lifted afterwards


def test_fixtures_load(files):
    """The unmutated files load, and the GGUF re-encoder round-trips (so edits below test what they say)."""
    for path in (files.g3, files.g3q8, files.g4, files.g4f16, files.hf3, files.hf4, files.moe):
        assert load_or_wren_error(path) is None, path
    for path in (files.g3, files.g4f16):
        copy = files.write(encode_gguf(*decode_gguf(path)))
        ids = torch.tensor([[5, 6, 7]])
        torch.testing.assert_close(wren.load(copy)(ids), wren.load(path)(ids), rtol=0, atol=0)


# --- GGUF: targeted ------------------------------------------------------------------------------------------

def _patch(raw: bytes, at: int, fmt: str, value) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def test_gguf_truncated(files):
    raw = files.g3.read_bytes()
    fields, header_end = gguf_fields(raw)
    tokens = raw.index(b"tokenizer.ggml.tokens")
    tensor_info = raw.index(b"blk.0.attn_q.weight")
    cuts = [0, 3, 4, 7, 8, 15, 23, 24, 30, tokens, tokens + 30, tokens + 3000, tensor_info, tensor_info + 25,
            header_end - 1, header_end, header_end + 1, len(raw) // 2, len(raw) - 1]
    cuts += [pos + 1 for pos, _ in fields[::97]]
    for cut in cuts:
        with pytest.raises(ModelFormatError, match="truncated|corrupt|too short|past the end"):
            GGUFFile(files.write(raw[:cut]))
        expect(files.write(raw[:cut]), ModelFormatError)


@pytest.mark.parametrize("magic", [b"GGUG", b"FUGG", b"\0\0\0\0", b"PK\3\4"])
def test_gguf_bad_magic(files, magic):
    raw = files.g3.read_bytes()
    expect(files.write(magic + raw[4:]), ModelFormatError, "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 2**31, 2**32 - 1])
def test_gguf_unsupported_version(files, version):
    expect(files.write(_patch(files.g3.read_bytes(), 4, "<I", version)), UnsupportedModelError, "version")


@pytest.mark.parametrize("at,value", [(8, 2**63), (8, 2**64 - 1), (8, 2**40), (16, 2**64 - 1), (16, 2**62),
                                      (16, 10**6), (8, 0), (16, 0)])
def test_gguf_huge_counts(files, at, value):
    """at 8: n_tensors, at 16: n_kv."""
    expect(files.write(_patch(files.g3.read_bytes(), at, "<Q", value)), WrenError)


@pytest.mark.parametrize("value", [2**62, 2**64 - 1, 2**32, 10**7])
def test_gguf_huge_string_length(files, value):
    raw = files.g3.read_bytes()
    expect(files.write(_patch(raw, 24, "<Q", value)), ModelFormatError)  # the first key's length
    name = raw.index(b"blk.0.attn_q.weight") - 8  # a tensor name's length
    expect(files.write(_patch(raw, name, "<Q", value)), ModelFormatError)


@pytest.mark.parametrize("value", [2**60, 2**64 - 1, 2**61 + 1, 10**6])
def test_gguf_huge_array_count(files, value):
    raw = files.g3.read_bytes()
    for key in (b"tokenizer.ggml.tokens", b"tokenizer.ggml.scores"):
        count = raw.index(key) + len(key) + 8  # after the value type and the element type
        expect(files.write(_patch(raw, count, "<Q", value)), ModelFormatError)


def test_gguf_bad_value_types(files):
    raw = files.g3.read_bytes()
    vtype = raw.index(b"general.architecture") + len(b"general.architecture")
    for value in (13, 255, 2**32 - 1):
        expect(files.write(_patch(raw, vtype, "<I", value)), ModelFormatError)
    etype = raw.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4
    for value in (9, 13, 2**32 - 1):  # an array of arrays, unknown types
        expect(files.write(_patch(raw, etype, "<I", value)), ModelFormatError)


def _edit_tensor(files, path, name, **changes):
    meta, tensors, data = decode_gguf(path)
    for i, (n, shape, ggml_type, offset) in enumerate(tensors):
        if n == name:
            tensors[i] = (n, changes.get("shape", shape), changes.get("ggml_type", ggml_type),
                          changes.get("offset", offset))
    return files.write(encode_gguf(meta, tensors, data))


@pytest.mark.parametrize("shape", [(), (1,) * 9, (1,) * 1000, (2**50, 64), (64, 2**50), (2**40, 2**40),
                                   (0, 64), (384, 0), (2**64 - 1, 1)])
def test_gguf_absurd_shapes(files, shape):
    expect(_edit_tensor(files, files.g3, "token_embd.weight", shape=shape), ModelFormatError)


@pytest.mark.parametrize("offset", [2**64 - 1, 2**63, 2**40, 10**6, 1])
def test_gguf_offset_past_end_or_misplaced(files, offset):
    """Past the end, or overlapping another tensor's bytes (which would let a small file pose as a huge
    model: every layer reading the same bytes)."""
    expect(_edit_tensor(files, files.g3, "output_norm.weight", offset=offset), ModelFormatError)


def test_gguf_overlapping_tensors(files):
    meta, tensors, data = decode_gguf(files.g3)
    first = next(t for t in tensors if t[0] == "blk.0.attn_q.weight")
    tensors = [(n, s, t, first[3]) if n.endswith("attn_q.weight") else (n, s, t, o) for n, s, t, o in tensors]
    expect(files.write(encode_gguf(meta, tensors, data)), ModelFormatError, "overlap")


@pytest.mark.parametrize("ggml_type", [4, 5, 99, 2**31, 2**32 - 1])
def test_gguf_unknown_tensor_type(files, ggml_type):
    expect(_edit_tensor(files, files.g3, "token_embd.weight", ggml_type=ggml_type), UnsupportedModelError)


def test_gguf_type_that_does_not_fit_the_shape(files):
    # Q8_0 needs rows of 32: a 1-D norm of 64 fits, token_embd re-typed as Q4_K (256-wide blocks) does not.
    expect(_edit_tensor(files, files.g3, "token_embd.weight", ggml_type=12), ModelFormatError, "block size")


@pytest.mark.parametrize("alignment", [0, 3, 48, -32, 2**64 - 1, 1.5, "32", True])
def test_gguf_bad_alignment(files, alignment):
    meta, tensors, data = decode_gguf(files.g3)
    meta["general.alignment"] = alignment
    pad = alignment if isinstance(alignment, int) and 0 < alignment < 64 and alignment != 1 else 32
    expect(files.write(encode_gguf(meta, tensors, data, alignment=pad)), ModelFormatError, "alignment")


def _edit_meta(files, path, **changes):
    meta, tensors, data = decode_gguf(path)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return files.write(encode_gguf(meta, tensors, data))


@pytest.mark.parametrize("changes,error", [
    ({"general__architecture": "llama"}, UnsupportedModelError),
    ({"general__architecture": None}, ModelFormatError),
    ({"general__architecture": 7}, ModelFormatError),
    ({"gemma3__embedding_length": "64"}, ModelFormatError),
    ({"gemma3__embedding_length": 0}, ModelFormatError),
    ({"gemma3__embedding_length": 10**12}, ModelFormatError),
    ({"gemma3__embedding_length": -64}, ModelFormatError),
    ({"gemma3__block_count": 62}, ModelFormatError),
    ({"gemma3__block_count": 2**24 - 1}, ModelFormatError),
    ({"gemma3__block_count": 2**63 - 1}, ModelFormatError),
    ({"gemma3__block_count": None}, ModelFormatError),
    ({"gemma3__block_count": 2.5}, ModelFormatError),
    ({"gemma3__attention__head_count": 0}, ModelFormatError),
    ({"gemma3__attention__head_count": 3}, ModelFormatError),
    ({"gemma3__attention__head_count_kv": 3}, ModelFormatError),
    ({"gemma3__attention__key_length": 15}, ModelFormatError),
    ({"gemma3__feed_forward_length": np.array([96] * 6, dtype=np.int32)}, ModelFormatError),
    ({"gemma3__attention__layer_norm_rms_epsilon": "tiny"}, ModelFormatError),
    ({"gemma3__attention__sliding_window": 0}, ModelFormatError),
    ({"gemma3__attention__sliding_window": "6"}, ModelFormatError),
    ({"gemma3__context_length": 0}, ModelFormatError),
    ({"gemma3__rope__freq_base": "1e6"}, ModelFormatError),
    ({"gemma3__rope__scaling__factor": "x"}, ModelFormatError),
    ({"gemma3__final_logit_softcapping": "30"}, ModelFormatError),
    ({"tokenizer__ggml__model": "wordpiece"}, UnsupportedModelError),
    ({"tokenizer__ggml__model": None}, ModelFormatError),
    ({"tokenizer__ggml__tokens": None}, ModelFormatError),
    ({"tokenizer__ggml__tokens": 5}, ModelFormatError),
    ({"tokenizer__ggml__tokens": np.arange(384, dtype=np.int32)}, ModelFormatError),
    ({"tokenizer__ggml__tokens": [f"t{i}" for i in range(1000)]}, ModelFormatError),
    ({"tokenizer__ggml__scores": np.zeros(3, dtype=np.float32)}, ModelFormatError),
    ({"tokenizer__ggml__token_type": "x"}, ModelFormatError),
    ({"tokenizer__ggml__bos_token_id": 10**6}, ModelFormatError),
    ({"tokenizer__ggml__bos_token_id": -1}, ModelFormatError),
    ({"tokenizer__ggml__merges": ["zz qq", "no-space"]}, ModelFormatError),
    ({"tokenizer__ggml__merges": np.arange(3, dtype=np.int32)}, ModelFormatError),
    ({"tokenizer__ggml__add_space_prefix": np.arange(3, dtype=np.int32)}, ModelFormatError),
], ids=lambda v: str(v)[:60] if isinstance(v, dict) else v.__name__)
def test_gguf_bad_metadata(files, changes, error):
    expect(_edit_meta(files, files.g3, **changes), error)


@pytest.mark.parametrize("changes", [
    {"gemma4__attention__sliding_window_pattern": np.ones(7, dtype=bool)},  # no full-attention layer
    {"gemma4__attention__sliding_window_pattern": np.ones(3, dtype=bool)},
    {"gemma4__attention__sliding_window_pattern": None},
    {"gemma4__attention__sliding_window_pattern": 1},
    {"gemma4__attention__key_length": 0},
    {"gemma4__attention__key_length": 31},
    {"gemma4__attention__key_length": 2**40},
    {"gemma4__attention__key_length_swa": 0},
    {"gemma4__attention__shared_kv_layers": "3"},
    {"gemma4__attention__shared_kv_layers": 7},
    {"gemma4__attention__shared_kv_layers": 2**60},
    {"gemma4__feed_forward_length": np.array([96] * 3, dtype=np.int32)},
    {"gemma4__feed_forward_length": np.array([], dtype=np.int32)},
    {"gemma4__feed_forward_length": ["96"] * 7},
    {"gemma4__attention__head_count_kv": np.array([1, 2, 3, 1, 1, 1, 1], dtype=np.int32)},
    {"gemma4__block_count": 0},
    {"gemma4__embedding_length_per_layer_input": 9},
    {"gemma4__embedding_length_per_layer_input": -8},
    {"gemma4__expert_count": 4},
    {"gemma4__rope__freq_base_swa": "x"},
], ids=lambda d: str(d)[:70])
def test_gguf_bad_gemma4_metadata(files, changes):
    expect(_edit_meta(files, files.g4, **changes), WrenError)


@pytest.mark.parametrize("name,changes", [
    ("rope_freqs.weight", {"shape": (32,), "ggml_type": 1}),  # re-typed as F16: more frequencies than the head has
    ("per_layer_token_embd.weight", {"shape": (384 * 56,)}),  # the PLE table made 1-D
    ("per_layer_token_embd.weight", {"shape": (56, 384)}),
    ("per_layer_token_embd.weight", {"shape": (2, 192, 56)}),
    ("token_embd.weight", {"shape": (64, 384)}),
    ("token_embd.weight", {"shape": (2, 64)}),  # fewer rows than the tokenizer has tokens
    ("blk.0.attn_q.weight", {"shape": (64, 32)}),
])
def test_gguf_tensor_shapes_that_contradict(files, name, changes):
    expect(_edit_tensor(files, files.g4f16, name, **changes), ModelFormatError)


def test_gguf_duplicate_tensor(files):
    meta, tensors, data = decode_gguf(files.g3)
    expect(files.write(encode_gguf(meta, tensors + tensors[:1], data)), ModelFormatError)


# --- safetensors and HF folders: targeted -------------------------------------------------------------------

def _st(files, src=None):
    return decode_safetensors(((src or files.hf3) / "model.safetensors").read_bytes())


def test_safetensors_truncated(files):
    raw = (files.hf3 / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    for cut in [0, 1, 7, 8, 9, 20, n // 2, n + 7, n + 8, n + 9, len(raw) // 2, len(raw) - 1]:
        with pytest.raises(ModelFormatError, match="truncated|corrupt|too short|not valid JSON"):
            SafetensorsFile(files.write(raw[:cut], ".safetensors"))
        expect(files.folder(files.hf3, safetensors=raw[:cut]), ModelFormatError)


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 2**40, 200 * 2**20, 0, 1])
def test_safetensors_bad_header_length(files, length):
    raw = (files.hf3 / "model.safetensors").read_bytes()
    expect(files.folder(files.hf3, safetensors=_patch(raw, 0, "<Q", length)), ModelFormatError)


@pytest.mark.parametrize("header", [b"{", b"\xff\xfe{}", b"[]", b"null", b"1", b'"x"', b"[" * 100_000,
                                    b'{"a": ' * 50_000, b'{"x": 1' + b"0" * 10_000 + b"}", b"\0" * 64,
                                    "{\"\ud800\": 1}".encode("utf-8", "surrogatepass")])
def test_safetensors_header_not_a_json_object(files, header):
    _, data = _st(files)
    expect(files.folder(files.hf3, safetensors=encode_safetensors({}, data, header)), ModelFormatError)


@pytest.mark.parametrize("field,value,error", [
    ("dtype", "F8_E4M3", UnsupportedModelError), ("dtype", "XYZ", UnsupportedModelError),
    ("dtype", ["F32"], ModelFormatError), ("dtype", None, ModelFormatError), ("dtype", {}, ModelFormatError),
    ("shape", [-1, 64], ModelFormatError), ("shape", [2**40, 2**40], ModelFormatError),
    ("shape", [10**30, 1], ModelFormatError), ("shape", [384, 64.0], ModelFormatError),
    ("shape", ["384", 64], ModelFormatError), ("shape", [True, 64], ModelFormatError),
    ("shape", [1] * 9, ModelFormatError), ("shape", 5, ModelFormatError),
    ("shape", [384, 32], ModelFormatError), ("shape", [], ModelFormatError),
    ("data_offsets", [10, 0], ModelFormatError), ("data_offsets", [0, 2**64], ModelFormatError),
    ("data_offsets", [-4, 0], ModelFormatError), ("data_offsets", [0], ModelFormatError),
    ("data_offsets", [0.0, 4.0], ModelFormatError), ("data_offsets", None, ModelFormatError),
    ("data_offsets", "shift", ModelFormatError),  # the right length, but moved past the end
    ("data_offsets", "overlap", ModelFormatError),  # on top of another tensor's bytes
])
def test_safetensors_bad_entry(files, field, value, error):
    header, data = _st(files)
    entry = header["model.embed_tokens.weight"]
    if value == "shift":
        begin, end = entry["data_offsets"]
        value = [len(data) - (end - begin) + 4, len(data) + 4]
    elif value == "overlap":
        value = header["model.norm.weight"]["data_offsets"]
        entry["shape"] = header["model.norm.weight"]["shape"]
    entry[field] = value
    path = files.folder(files.hf3, safetensors=encode_safetensors(header, data))
    expect(path, error)
    with pytest.raises(error):
        SafetensorsFile(path / "model.safetensors")


def test_safetensors_shape_that_contradicts_the_config(files):
    header, data = _st(files)
    header["model.embed_tokens.weight"]["shape"] = [64, 384]  # the same bytes, transposed
    expect(files.folder(files.hf3, safetensors=encode_safetensors(header, data)), ModelFormatError, "shape")


@pytest.mark.parametrize("entry", [None, 5, "F32", [1, 2], {}])
def test_safetensors_entry_not_an_object(files, entry):
    header, data = _st(files)
    header["model.norm.weight"] = entry
    expect(files.folder(files.hf3, safetensors=encode_safetensors(header, data)), ModelFormatError)


@pytest.mark.parametrize("dtype", ["I32", "U8", "BOOL", "I16", "F64"])
@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.norm.weight",
                                  "model.embed_tokens_per_layer.weight"])
def test_safetensors_other_dtypes_load_or_fail_cleanly(files, name, dtype):
    header, data = _st(files, files.hf4)
    entry = header[name]
    begin, end = entry["data_offsets"]
    entry["dtype"] = dtype
    size = DTYPES[dtype].itemsize
    if size > 4:  # the same bytes: half the rows
        entry["shape"][0] //= 2
    else:  # the same shape: fewer bytes
        entry["data_offsets"][1] = begin + (end - begin) * size // 4
    load_or_wren_error(files.folder(files.hf4, safetensors=encode_safetensors(header, data)))


def _index(shards: dict) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": shards}).encode()


@pytest.mark.parametrize("index,error", [
    (_index({"model.norm.weight": "../outside/model.safetensors"}), ModelFormatError),
    (_index({"model.norm.weight": "/etc/passwd"}), ModelFormatError),
    (_index({"model.norm.weight": "sub/model.safetensors"}), ModelFormatError),
    (_index({"model.norm.weight": ""}), ModelFormatError),
    (_index({"model.norm.weight": "."}), ModelFormatError),
    (_index({"model.norm.weight": "model-00002-of-00002.safetensors"}), ModelNotFoundError),
    (_index({"model.norm.weight": 5}), ModelFormatError),
    (_index({"model.norm.weight": ["a"]}), ModelFormatError),
    (_index({}), ModelNotFoundError),
    (_index(["model.safetensors"]), ModelFormatError),
    (b'{"weight_map": 5}', ModelFormatError),
    (b"[1]", ModelFormatError),
    (b"{", ModelFormatError),
    (b"\xff\xfe", ModelFormatError),
    (b"[" * 100_000, ModelFormatError),
])
def test_safetensors_bad_index(files, index, error):
    expect(files.folder(files.hf3, extra={"model.safetensors.index.json": index}), error)


def test_safetensors_shard_is_a_directory(files):
    folder = files.folder(files.hf3, extra={"model.safetensors.index.json": _index({"x": "shard.safetensors"})})
    (folder / "shard.safetensors").mkdir()
    expect(folder, ModelFormatError)


@pytest.mark.parametrize("config", [b"{", b"\xff\xfe{}", b"[]", b"null", b"[" * 100_000,
                                    b'{"model_type": "gemma3", "hidden_size": 1' + b"0" * 10_000 + b"}"])
def test_config_not_a_json_object(files, config):
    expect(files.folder(files.hf3, config=config), ModelFormatError)


def _set(d: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for p in parents:
        d = d[p]
    if value is DELETE:
        d.pop(last, None)
    else:
        d[last] = value


DELETE = object()


@pytest.mark.parametrize("changes,error", [
    ({"model_type": "llama"}, UnsupportedModelError),
    ({"model_type": DELETE}, UnsupportedModelError),
    ({"model_type": 5}, UnsupportedModelError),
    ({"model_type": ["gemma3"]}, WrenError),
    ({"text_config": "gemma3"}, ModelFormatError),
    ({"text_config": [1, 2]}, ModelFormatError),
    ({"hidden_size": 10**12}, ModelFormatError),
    ({"hidden_size": 2**24 - 1}, ModelFormatError),
    ({"vocab_size": 2**24 - 1}, ModelFormatError),
    ({"vocab_size": 2**24 - 1, "hidden_size": 2**24 - 1, "intermediate_size": 2**24 - 1}, ModelFormatError),
    ({"num_hidden_layers": 2**24 - 1}, ModelFormatError),
    ({"num_hidden_layers": 7}, ModelFormatError),
    ({"num_hidden_layers": 0}, ModelFormatError),
    ({"hidden_size": "64"}, ModelFormatError),
    ({"hidden_size": 64.0}, ModelFormatError),
    ({"hidden_size": None}, WrenError),
    ({"head_dim": 15}, ModelFormatError),
    ({"num_attention_heads": 3}, ModelFormatError),
    ({"num_key_value_heads": 3}, ModelFormatError),
    ({"rms_norm_eps": "1e-6"}, ModelFormatError),
    ({"rms_norm_eps": [1e-6]}, ModelFormatError),
    ({"sliding_window": "6"}, ModelFormatError),
    ({"sliding_window": 0}, ModelFormatError),
    ({"sliding_window": -5}, ModelFormatError),
    ({"sliding_window_pattern": 0, "layer_types": DELETE}, ModelFormatError),
    ({"layer_types": 5}, ModelFormatError),
    ({"layer_types": ["full_attention"]}, ModelFormatError),
    ({"layer_types": [1, 2, 3, 4, 5, 6]}, ModelFormatError),
    ({"max_position_embeddings": "x"}, ModelFormatError),
    ({"max_position_embeddings": 0}, ModelFormatError),
    ({"query_pre_attn_scalar": 0}, ModelFormatError),
    ({"query_pre_attn_scalar": -16}, ModelFormatError),
    ({"query_pre_attn_scalar": "16"}, ModelFormatError),
    ({"final_logit_softcapping": "30"}, ModelFormatError),
    ({"attn_logit_softcapping": [1]}, ModelFormatError),
    ({"rope_theta": "x"}, ModelFormatError),
    ({"rope_parameters": [1]}, ModelFormatError),
    ({"rope_parameters": "x"}, ModelFormatError),
    ({"rope_parameters.full_attention": 5}, ModelFormatError),
    ({"rope_parameters.full_attention.factor": "x"}, ModelFormatError),
    ({"rope_parameters.full_attention.rope_theta": [1]}, ModelFormatError),
    ({"rope_scaling": {"factor": "fast"}}, ModelFormatError),
    ({"tie_word_embeddings": False}, ModelFormatError),  # ... but no lm_head.weight in the checkpoint
    ({"bos_token_id": "x"}, ModelFormatError),
    ({"eos_token_id": [1, "x"]}, ModelFormatError),
    ({"pad_token_id": 1.5}, ModelFormatError),
], ids=lambda v: str(v)[:60] if isinstance(v, dict) else v.__name__)
def test_config_bad_gemma3_fields(files, changes, error):
    config = files.config(files.hf3)
    for key, value in changes.items():
        _set(config, key, value)
    expect(files.folder(files.hf3, config=config), error)


@pytest.mark.parametrize("src,changes", [
    ("hf4", {"per_layer_config": {"2": {"head_dim": 10**12}}}),
    ("hf4", {"per_layer_config": {"2": {"head_dim": "x"}}}),
    ("hf4", {"per_layer_config": {"2": 5}}),
    ("hf4", {"per_layer_config": [1]}),
    ("hf4", {"per_layer_config": DELETE, "global_head_dim": 10**12}),
    ("hf4", {"per_layer_config": DELETE, "global_head_dim": -32}),
    ("hf4", {"per_layer_config": DELETE, "global_head_dim": 33}),
    ("hf4", {"rope_parameters.full_attention.partial_rotary_factor": 1e12}),
    ("hf4", {"rope_parameters.full_attention.partial_rotary_factor": 2.0}),
    ("hf4", {"rope_parameters.full_attention.partial_rotary_factor": -1.0}),
    ("hf4", {"rope_parameters.full_attention.partial_rotary_factor": "x"}),
    ("hf4", {"rope_parameters.sliding_attention": "x"}),
    ("hf4", {"num_kv_shared_layers": 2**60}),
    ("hf4", {"num_kv_shared_layers": 7}),
    ("hf4", {"num_kv_shared_layers": "3"}),
    ("hf4", {"hidden_size_per_layer_input": -8}),
    ("hf4", {"hidden_size_per_layer_input": 2**40}),
    ("hf4", {"hidden_size_per_layer_input": "8"}),
    ("hf4", {"hidden_activation": ["gelu"]}),
    ("hf4", {"layer_types": ["sliding_attention"] * 6 + ["bidirectional"]}),
    ("moe", {"top_k_experts": 5}),
    ("moe", {"top_k_experts": -1}),
    ("moe", {"top_k_experts": "2"}),
    ("moe", {"num_experts": 2**40}),
    ("moe", {"num_experts": -4}),
    ("moe", {"moe_intermediate_size": -24}),
    ("moe", {"per_layer_config": DELETE, "num_global_key_value_heads": 3}),
    ("moe", {"per_layer_config": DELETE, "num_global_key_value_heads": -1}),
])
def test_config_bad_gemma4_fields(files, src, changes):
    src = getattr(files, src)
    config = files.config(src)
    for key, value in changes.items():
        _set(config, key, value)
    expect(files.folder(src, config=config), WrenError)


def test_bad_side_files(files):
    """A bad tokenizer_config.json or chat template is no reason to fail -- but not a crash either."""
    for name, content in [("tokenizer_config.json", b"\xff\xfe"), ("tokenizer_config.json", b"[" * 100_000),
                          ("tokenizer_config.json", b"[1]"), ("chat_template.jinja", b"\xff\xfe{{")]:
        assert load_or_wren_error(files.folder(files.hf3, extra={name: content})) is None
    expect(files.folder(files.hf3, extra={"tokenizer.json": b"\xff{"}), ModelFormatError)


# --- fuzzing ----------------------------------------------------------------------------------------------

EXTREMES = {
    1: [0, 1, 0x7F, 0x80, 0xFF],
    2: [0, 1, 0x7FFF, 0x8000, 0xFFFF],
    4: [0, 1, 2, 7, 8, 9, 10, 12, 13, 30, 31, 2**31 - 1, 2**31, 2**32 - 1],
    8: [0, 1, 2**31, 2**32, 2**40, 2**50, 2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1],
}


@st.composite
def _int_for(draw, size: int, original: int):
    choice = draw(st.sampled_from(["extreme", "near", "random"]))
    if choice == "extreme":
        return draw(st.sampled_from(EXTREMES[size]))
    if choice == "near":
        return (original + draw(st.integers(-3, 3))) % (1 << 8 * size)
    return draw(st.integers(0, (1 << 8 * size) - 1))


def _mutate_bytes(data, raw: bytes, header_end: int, fields=(), start: int = 0) -> bytes:
    """One random mutation of `raw`, mostly inside its header: bytes `start` to `header_end` (the magic
    number and the like before `start` have targeted tests; random edits there only hide the rest).

    Positions come from a Random seeded by Hypothesis: its own integers favour small values, which would
    aim most mutations at the first few bytes."""
    rnd = random.Random(data.draw(st.integers(0, 2**64 - 1)))
    fields = [(pos, size) for pos, size in fields if pos + size <= len(raw)]
    kinds = ["flip", "flip", "truncate", "insert", "delete", "word"]
    kind = data.draw(st.sampled_from(["field"] * 4 * bool(fields) + kinds[bool(fields):] if raw else ["insert"]))
    out = bytearray(raw)
    lo, hi = min(start, len(raw) - 1), max(0, min(header_end, len(raw)) - 1)
    if kind == "word" and len(raw) < 8:
        kind = "flip"
    if kind == "field":
        pos, size = rnd.choice(fields)
        value = data.draw(_int_for(size, int.from_bytes(raw[pos:pos + size], "little")))
        out[pos:pos + size] = value.to_bytes(size, "little")
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            out[rnd.randint(lo, hi)] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del out[rnd.randrange(len(raw)):]
    elif kind == "insert":
        pos = rnd.randint(lo, hi)
        out[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        pos = rnd.randint(lo, hi)
        del out[pos:pos + data.draw(st.integers(1, 16))]
    else:  # an 8-byte word anywhere, data included
        pos = rnd.randint(0, len(raw) - 8)
        out[pos:pos + 8] = data.draw(_int_for(8, 0)).to_bytes(8, "little")
    return bytes(out)


class Original:
    """A valid file's bytes and the header fields to aim at (with a short repr for Hypothesis' reports)."""

    def __init__(self, path):
        self.name, self.raw = path.name, path.read_bytes()
        self.fields, self.header_end = gguf_fields(self.raw)

    def __repr__(self):
        return f"Original({self.name})"


@pytest.fixture(scope="module")
def gguf_originals(files):
    return {name: Original(getattr(files, name)) for name in ("g3", "g3q8", "g4f16")}


@pytest.mark.parametrize("name", ["g3", "g3q8", "g4f16"])
@FUZZ
@given(data=st.data())
def test_fuzz_gguf(files, gguf_originals, name, data):
    original = gguf_originals[name]
    raw, fields, header_end = original.raw, original.fields, original.header_end
    for _ in range(data.draw(st.integers(1, 3))):
        raw = _mutate_bytes(data, raw, header_end, fields, start=4)
    path = files.write(raw)
    try:
        load_or_wren_error(path)
    finally:
        path.unlink()


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, 1, -1, 2**31, 2**40, 2**63, 2**64, 10**30, -(2**63)]),
    st.integers(-1000, 1000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.integers(-5, 500), max_size=9), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _mutate_json(data, obj):
    """Replace, delete or add one field somewhere in a JSON object (keys of nested objects included)."""
    paths = []

    def walk(o, prefix):
        if isinstance(o, dict):
            for k, v in o.items():
                paths.append((o, k))
                walk(v, prefix + (k,))
        elif isinstance(o, list):
            for i, v in enumerate(o):
                paths.append((o, i))
                walk(v, prefix + (i,))

    walk(obj, ())
    parent, key = data.draw(st.sampled_from(paths))
    if isinstance(parent, dict) and data.draw(st.integers(0, 5)) == 0:
        del parent[key]
    else:
        parent[key] = data.draw(JSON_VALUES)


@pytest.mark.parametrize("src", ["hf3", "hf4"])
@FUZZ
@given(data=st.data())
def test_fuzz_safetensors(files, src, data):
    folder = getattr(files, src)
    raw = (folder / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    structured = data.draw(st.booleans())
    if structured:  # an edit of the JSON header
        header, body = decode_safetensors(raw)
        for _ in range(data.draw(st.integers(1, 2))):
            _mutate_json(data, header)
        raw = encode_safetensors(header, body)
    for _ in range(data.draw(st.integers(0 if structured else 1, 2))):
        raw = _mutate_bytes(data, raw, header_end, start=8)
    path = files.folder(folder, safetensors=raw)
    try:
        load_or_wren_error(path)
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("src", ["hf3", "hf4", "moe"])
@FUZZ
@given(data=st.data())
def test_fuzz_config(files, src, data):
    folder = getattr(files, src)
    config = files.config(folder)
    for _ in range(data.draw(st.integers(1, 2))):
        _mutate_json(data, config)
    path = files.folder(folder, config=json.dumps(config).encode())
    try:
        load_or_wren_error(path)
    finally:
        shutil.rmtree(path)
