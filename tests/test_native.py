"""The compiled CPU kernels (wren/_native.c) against the PyTorch code they stand in for: decode attention
over a dense cache, RMSNorm with RoPE or a residual. (The TurboQuant matmul is in test_tq_kernels.py.)"""

from __future__ import annotations

import pytest
import torch

from wren import native
from wren.models.layers import RMSNorm, apply_rope, attend, attention_mask, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(not native.available(), reason="the compiled kernels are not built here (no C "
                                "compiler at install) or this CPU has no AVX-512 VNNI")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,slots,window,softcap,padded", [
    (4, 1, 37, None, None, False), (8, 2, 600, 128, None, True), (2, 2, 300, None, 50.0, False),
    (4, 4, 5, 3, None, True)])
def test_decode_attention_matches_attend(dtype, heads, kv_heads, slots, window, softcap, padded):
    d = 32
    q = torch.randn(1, heads, 1, d, generator=_gen(1))
    buffer_k = torch.randn(1, kv_heads, slots + 7, d, generator=_gen(2)).to(dtype)  # a longer buffer: strides
    buffer_v = torch.randn(1, kv_heads, slots + 7, d, generator=_gen(3)).to(dtype)
    keys, values = buffer_k[:, :, :slots], buffer_v[:, :, :slots]
    key_pos = torch.randperm(slots, generator=_gen(4))  # a ring holds positions out of order
    key_pos[:3] = -1  # empty slots
    position = int(key_pos.max())
    valid = (torch.rand(1, slots, generator=_gen(5)) > 0.2) if padded else None
    got = native.attend_one(q, keys, values, key_pos, valid, position, window, 0.125, softcap)
    mask = attention_mask(torch.tensor([[position]]), key_pos[None], window, valid)
    expected = attend(q, keys.float(), values.float(), mask, 0.125, softcap)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_decode_attention_that_sees_nothing_is_zero():
    q = torch.randn(1, 2, 1, 16, generator=_gen(1))
    kv = torch.randn(1, 1, 4, 16, generator=_gen(2))
    got = native.attend_one(q, kv, kv, torch.full((4,), -1), None, 0, None, 1.0, None)
    assert torch.equal(got, torch.zeros(1, 1, 32))


@pytest.mark.parametrize("offset,with_scale", [(1.0, True), (0.0, True), (0.0, False)])
def test_norm_with_rope_or_residual_matches_pytorch(offset, with_scale):
    norm = RMSNorm(64, 1e-6, offset=offset, with_scale=with_scale)
    if with_scale:
        norm.weight.data = torch.randn(64, generator=_gen(7))
    x = torch.randn(2, 5, 3, 64, generator=_gen(8)) * 4
    cos, sin = rope_cos_sin(torch.arange(5).expand(2, 5) + 11, rope_inv_freq(64, 64, 10000.0), torch.float32)
    with torch.inference_mode():
        got_rope = native.rms_norm(x, norm.weight, offset, 1e-6, rope=(cos, sin))
        residual = torch.randn_like(x)
        got_residual = native.rms_norm(x, norm.weight, offset, 1e-6, residual=residual)
        plain = native.rms_norm(x, norm.weight, offset, 1e-6)
    h = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
    if with_scale:
        h = h * (norm.weight + offset)
    assert torch.allclose(plain, h, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got_rope, apply_rope(h, cos, sin), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got_residual, residual + h, atol=1e-5, rtol=1e-5)


def test_gelu_mul_matches_pytorch():
    gate, up = torch.randn(2, 3, 333, generator=_gen(1)) * 4, torch.randn(2, 3, 333, generator=_gen(2))
    with torch.inference_mode():
        got = native.gelu_mul(gate, up)
    assert torch.allclose(got, torch.nn.functional.gelu(gate, approximate="tanh") * up, atol=1e-6, rtol=1e-5)
    assert native.gelu_mul(gate.double(), up.double()) is None  # not float32: the caller's PyTorch path
    wide = torch.zeros(native.GELU_MAX + 1)
    assert native.gelu_mul(wide, wide) is None  # prefill-sized: PyTorch's threaded gelu is faster


def test_autograd_takes_the_pytorch_path():
    norm = RMSNorm(16, 1e-6, offset=1.0)
    x = torch.randn(3, 16, requires_grad=True)
    assert not native.norms(x, norm.weight)
    norm(x).sum().backward()
    assert x.grad is not None


@pytest.fixture(scope="module")
def quantized_gemma3(tmp_path_factory):
    """A tiny Gemma 3 whose projections all take the compiled kernels (widths multiples of 64), at 4 bits."""
    import wren
    from gguf_writer import save_hf
    from tiny_models import gemma3_hf
    from wren.quant import folder

    path = tmp_path_factory.mktemp("gemma3-128")
    save_hf(gemma3_hf(seed=3, intermediate=128), path)
    model = wren.load(path)
    folder.quantize_model(model, bits=4, group=64, embed_bits=8)
    return model


def _decode(model, spec, steps=20):
    from wren.kv import make_kv_cache

    ids = torch.randint(0, 384, (1, 5 + steps), generator=_gen(11))
    with torch.inference_mode():
        cache = make_kv_cache(model, batch=1, max_len=ids.shape[1], spec=spec)
        logits = [model(ids[:, :5], cache, logits_to_keep=1)]
        logits += [model(ids[:, i:i + 1], cache) for i in range(5, ids.shape[1])]  # past the window of 6
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("spec,planned", [(None, True), ("f16", True), ("bf16", True), ("q8", False), ("tq4", False)])
def test_decode_plan_computes_what_the_layers_compute(quantized_gemma3, monkeypatch, spec, planned):
    from wren import decode_plan

    got, cache = _decode(quantized_gemma3, spec)
    assert (cache._decode_plan[1] is not None) == planned  # dense caches of one sequence only
    monkeypatch.setattr(decode_plan, "ENABLED", False)
    expected, cache = _decode(quantized_gemma3, spec)
    assert not hasattr(cache, "_decode_plan")
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


def test_without_the_compiled_kernels_the_model_runs_on_pytorch(quantized_gemma3, monkeypatch):
    """No built module (no C compiler at install): every path falls back, to within the kernels' tolerance."""
    with_kernels, _ = _decode(quantized_gemma3, "f16", steps=6)
    monkeypatch.setattr(native, "_native", None)
    native.available.cache_clear()
    try:
        assert not native.available()
        without, cache = _decode(quantized_gemma3, "f16", steps=6)
        assert not hasattr(cache, "_decode_plan")
    finally:
        monkeypatch.undo()
        native.available.cache_clear()
    assert native.available()
    # int8 inputs on one side, bf16 on the other: the ~1% of test_tq_kernels, on logits
    assert (with_kernels - without).norm() / without.norm() < 0.03


def test_a_cache_handed_to_another_model_gets_its_own_plan(quantized_gemma3):
    import copy

    from wren.kv import make_kv_cache

    other = copy.deepcopy(quantized_gemma3)
    ids = torch.randint(0, 384, (1, 4), generator=_gen(5))
    with torch.inference_mode():
        cache = make_kv_cache(quantized_gemma3, batch=1, max_len=8)
        quantized_gemma3(ids[:, :2], cache)
        quantized_gemma3(ids[:, 2:3], cache)
        first = cache._decode_plan
        other(ids[:, 3:4], cache)  # the same cache, another model (its own weight tensors)
    assert first[0]() is quantized_gemma3 and first[1] is not None
    assert cache._decode_plan[0]() is other and cache._decode_plan[1] is not first[1]


def test_decode_layer_refuses_rows_wider_than_its_stack_buffers():
    layout = native._native.plan_layout()
    plan = torch.zeros(layout["fields"], dtype=torch.int64)
    plan[layout["hidden"]], plan[layout["head_dim"]] = native.MAX_WIDTH + 64, 64  # Gemma 3 27B's 5376 is wider
    floats = torch.zeros(layout["float_fields"], dtype=torch.float64)
    with pytest.raises(ValueError, match="up to 4096"):
        native._native.decode_layer(plan.data_ptr(), floats.data_ptr(), 0, 0, 0, 0, 1)
