"""wren.weights.gguf_quants against gguf-py's numpy reference, bit for bit."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

import wren.weights.gguf_quants as gq
from wren.errors import ModelFormatError, UnsupportedModelError
from wren.weights.gguf_quants import SUPPORTED_TYPES, dequantize, tensor_nbytes


# Types gguf-py can quantize (and so give us realistic blocks for).
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
BLOCK_TYPES = sorted(SUPPORTED_TYPES - {QT.F32, QT.F16, QT.BF16})

# Byte offsets of each block's fp16 scale fields (ggml-common.h). Random bytes
# there could be inf/NaN; everything else in a block is a valid bit pattern.
F16_FIELDS = {
    QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
    QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208],
}


def random_blocks(qtype: QT, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks whose scale fields hold finite values."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, []):
        scales = rng.standard_normal(n_blocks).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    if qtype == QT.Q8_K:  # its d is a float32
        blocks[:, 0:4] = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    return blocks.reshape(-1)


def reference(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    if qtype == QT.Q8_K:  # gguf-py has no Q8_K; it is just d * int8
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        d = blocks[:, 0:4].copy().view(np.float32)
        return (blocks[:, 4:260].view(np.int8).astype(np.float32) * d).reshape(shape)
    row_bytes = tensor_nbytes(qtype, shape[-1:])
    return gguf.quants.dequantize(raw.reshape(-1, row_bytes), qtype).reshape(shape)


def assert_bit_identical(got: torch.Tensor, want: np.ndarray) -> None:
    assert got.dtype == torch.float32
    assert tuple(got.shape) == want.shape
    # compare bit patterns: exact, 0 ulp, and -0.0 != +0.0
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.astype(np.float32).view(np.uint32))


def read_only(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_by_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    block = GGML_QUANT_SIZES[qtype][0]
    shape = (3, 5, block * 4 if block > 1 else 96)
    data = (rng.standard_normal(shape) * 3).astype(np.float32)
    data[0, 0, :block] = 0  # an all-zero block (scale 0)
    raw = read_only(gguf.quants.quantize(data, qtype).view(np.uint8).reshape(-1))
    assert_bit_identical(dequantize(raw, int(qtype), shape), reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: QT(t).name)
def test_random_blocks(qtype):
    qtype = QT(qtype)
    rng = np.random.default_rng(100 + int(qtype))
    block = GGML_QUANT_SIZES[qtype][0]
    shape = (6, block * 5)
    raw = read_only(random_blocks(qtype, math.prod(shape) // block, rng))
    assert_bit_identical(dequantize(raw, int(qtype), shape), reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: QT(t).name)
def test_chunk_boundaries(qtype, monkeypatch):
    # chunks of 3 blocks never line up with the 5-block rows
    qtype = QT(qtype)
    block = GGML_QUANT_SIZES[qtype][0]
    monkeypatch.setattr(gq, "_CHUNK_WEIGHTS", 3 * block)
    shape = (7, block * 5)
    raw = random_blocks(qtype, math.prod(shape) // block, np.random.default_rng(7))
    assert_bit_identical(dequantize(raw, int(qtype), shape), reference(raw, qtype, shape))


def test_input_is_not_written_and_f32_views_only_writable_buffers():
    data = np.arange(64, dtype=np.float32)
    raw = data.view(np.uint8)
    view = dequantize(raw, QT.F32, (4, 16))
    assert view.data_ptr() == raw.ctypes.data  # zero-copy
    frozen = read_only(raw)
    copy = dequantize(frozen, QT.F32, (4, 16))
    assert copy.data_ptr() != raw.ctypes.data
    copy.add_(1)  # must not fault or change the source
    assert np.array_equal(data, np.arange(64, dtype=np.float32))


def test_memmap_slice(tmp_path):
    rng = np.random.default_rng(3)
    raw = random_blocks(QT.Q4_K, 8, rng)
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x00" * 32 + raw.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    got = dequantize(mm[32:32 + raw.nbytes], QT.Q4_K, (2, 1024))
    assert_bit_identical(got, reference(raw, QT.Q4_K, (2, 1024)))


def test_tensor_nbytes():
    assert tensor_nbytes(QT.F32, (3, 5)) == 60
    assert tensor_nbytes(QT.BF16, (7,)) == 14
    assert tensor_nbytes(QT.Q8_0, (262144, 640)) == 262144 * 20 * 34
    assert tensor_nbytes(QT.Q4_K, (2, 3, 512)) == 6 * 2 * 144
    assert tensor_nbytes(QT.Q6_K, (0, 256)) == 0


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_empty_tensor(qtype):
    out = dequantize(np.zeros(0, np.uint8), qtype, (0, 256))
    assert out.shape == (0, 256) and out.dtype == torch.float32


def test_short_and_long_buffers():
    raw = random_blocks(QT.Q5_0, 4, np.random.default_rng(0))
    with pytest.raises(ModelFormatError, match="Q5_0.*needs 88 bytes.*87"):
        dequantize(raw[:-1], QT.Q5_0, (2, 64))
    with pytest.raises(ModelFormatError, match="Q5_0"):
        dequantize(np.concatenate([raw, raw[:1]]), QT.Q5_0, (2, 64))


def test_huge_shape_is_rejected_before_allocating():
    with pytest.raises(ModelFormatError, match="Q8_0"):
        dequantize(np.zeros(34, np.uint8), QT.Q8_0, (1 << 40, 1 << 20))


def test_bad_shapes():
    with pytest.raises(ModelFormatError, match="Q4_K.*block size \\(256\\)"):
        dequantize(np.zeros(144, np.uint8), QT.Q4_K, (1, 100))
    with pytest.raises(ModelFormatError, match="Q8_0.*multiple"):
        tensor_nbytes(QT.Q8_0, (4, 33))
    with pytest.raises(ModelFormatError, match="negative"):
        tensor_nbytes(QT.F32, (-1, 4))


@pytest.mark.parametrize("ggml_type, name", [(9999, "9999"), (int(QT.IQ2_XXS), "IQ2_XXS"), (int(QT.Q8_1), "Q8_1")])
def test_unsupported_types(ggml_type, name):
    with pytest.raises(UnsupportedModelError, match=name):
        dequantize(np.zeros(64, np.uint8), ggml_type, (1, 256))
    with pytest.raises(UnsupportedModelError, match=name):
        tensor_nbytes(ggml_type, (1, 256))


def test_supported_types():
    assert isinstance(SUPPORTED_TYPES, frozenset)
    want = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
    assert want <= {QT(t).name for t in SUPPORTED_TYPES}


# --- the real Gemma 3 270M Q4_K_M file (the default model's package) ----------

@pytest.fixture(scope="module")
def real_reader(default_gguf):
    return gguf.GGUFReader(default_gguf)  # slow (seconds): opened once for the module


def file_bytes(reader, tensor) -> np.ndarray:
    return reader.data[tensor.data_offset:tensor.data_offset + tensor.n_bytes]


def test_real_file_tensors_match_reference(real_reader):
    # the smallest tensor of each type in the file
    smallest = {}
    for t in real_reader.tensors:
        if t.tensor_type not in smallest or t.n_bytes < smallest[t.tensor_type].n_bytes:
            smallest[t.tensor_type] = t
    assert {QT.F32, QT.Q8_0, QT.Q5_0, QT.Q4_K, QT.Q6_K} <= set(smallest)
    for qtype, t in smallest.items():
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF ne order is reversed
        want = gguf.quants.dequantize(t.data, qtype).reshape(shape)
        assert_bit_identical(dequantize(file_bytes(real_reader, t), int(qtype), shape), want)


def test_real_file_all_tensors_decode(real_reader):
    for t in real_reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        out = dequantize(file_bytes(real_reader, t), int(t.tensor_type), shape)
        assert tuple(out.shape) == shape and out.dtype == torch.float32, t.name
        assert torch.isfinite(out).all(), t.name
