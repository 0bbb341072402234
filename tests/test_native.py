"""The compiled CPU kernels (wren/_native.c) against the PyTorch code they stand in for: decode attention
over a dense cache, RMSNorm with RoPE or a residual. (The TurboQuant matmul is in test_tq_kernels.py.)"""

from __future__ import annotations

import pytest
import torch

from wren import native
from wren.models.layers import RMSNorm, apply_rope, attend, attention_mask, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(not native.available(), reason="the compiled kernels are not built here (no C "
                                "compiler at install) or this CPU has neither AVX-512 VNNI nor AVX2")


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


@pytest.mark.parametrize("cache", ["f16", "tq4"])
@pytest.mark.parametrize("per_row_positions", [False, True], ids=["shared-slots", "server-rows"])
def test_batched_decode_attention_matches_the_ops(per_row_positions, cache):
    """One decoded token of each of 3 sequences (cached_attention with batch 3) runs the kernel a row at a
    time, over a dense cache or a TurboQuant cache's codes: each row at its own position, over its own valid
    slots (left padding) or its own slot positions (the server's rows, SlotCache), as the mask and `attend`
    give."""
    from wren.kv import codec_for
    from wren.models.layers import Coded, _attention_by_ops, _row_kernel, cached_attention

    if cache == "tq4" and not native._native.codes_supported():
        pytest.skip("this CPU has neither AVX-512 VBMI nor AVX2 (the TurboQuant cache is decoded instead)")
    b, heads, kv_heads, slots, d = 3, 4, 1, 40, 128
    q = torch.randn(b, heads, 1, d, generator=_gen(1))
    keys = torch.randn(b, kv_heads, slots, d, generator=_gen(2))
    values = torch.randn(b, kv_heads, slots, d, generator=_gen(3))
    if cache == "tq4":
        codec = codec_for("tq4", d)
        keys, values = Coded(codec.encode(keys), codec), Coded(codec.encode(values), codec)
        reference = keys, values  # decoded by the ops path
    else:
        keys, values = keys.half(), values.half()
        reference = keys.float(), values.float()
    if per_row_positions:  # rows of different lengths, their positions in other slots (rings), as the server's
        key_pos = torch.full((b, slots), -1)
        for row, n in enumerate((40, 17, 3)):
            key_pos[row, torch.randperm(slots, generator=_gen(row))[:n]] = torch.arange(n)
        pos, valid = torch.tensor([[39], [16], [2]]), None
    else:  # a batch left-padded to one length: the same positions, the padding invalid
        key_pos, pos = torch.arange(slots), torch.full((b, 1), slots - 1)
        valid = torch.ones(b, slots, dtype=torch.bool)
        valid[1, :12], valid[2, :30] = False, False
    assert _row_kernel(q, keys, values) is (native.attend_codes if cache == "tq4" else native.attend_one)
    for window in (None, 8):
        got = cached_attention(q, (keys, values, key_pos, valid), pos, window, 0.125, None)
        want = _attention_by_ops(q, (*reference, key_pos, valid), pos, window, 0.125, None)
        assert got.shape == want.shape == (b, 1, heads * d)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


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


def test_a_cpu_without_avx512_runs_the_avx2_build():
    """The kernels come from the default build where the CPU has AVX-512 VNNI, else from the AVX2 one."""
    from wren import _native as default

    if default.supported():
        assert native._native is default
    else:
        assert native._cpu_has_avx2()  # (else this module is skipped: nothing runs the kernels)
        assert native._native.__name__ == "wren._native_avx2" and native._native.supported()


def test_gelu_mul_matches_pytorch():
    gate, up = torch.randn(2, 3, 333, generator=_gen(1)) * 4, torch.randn(2, 3, 333, generator=_gen(2))
    wide = torch.linspace(-200, 200, 4099)  # past where e^x over- and underflows, and a tail of 3
    with torch.inference_mode():
        for gate, up in ((gate, up), (wide, torch.randn(4099, generator=_gen(3)))):
            got = native.gelu_mul(gate, up)
            want = torch.nn.functional.gelu(gate, approximate="tanh") * up
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
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
    """A tiny Gemma 3 whose projections all take the compiled kernels (widths multiples of 64), at 4 bits, with
    heads of 64 (what the TurboQuant cache's compiled attention reads)."""
    import wren
    from gguf_writer import save_hf
    from tiny_models import gemma3_hf
    from wren.quant import folder

    path = tmp_path_factory.mktemp("gemma3-128")
    save_hf(gemma3_hf(seed=3, intermediate=128, head_dim=64), path)
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


@pytest.mark.parametrize("spec,planned", [(None, True), ("f16", True), ("bf16", True), ("q8", False), ("tq4", True),
                                          ("tq3/tq2", True), ("tq3.5", False)])
def test_decode_plan_computes_what_the_layers_compute(quantized_gemma3, monkeypatch, spec, planned):
    """Step by step from the same cache: the layers' modules decode, and at each step a copy of their cache
    takes the plan (dense caches of one sequence; TurboQuant ones whose codes the kernel reads)."""

    def same_codes(planned_cache, cache):
        assert (planned_cache._decode_plan[1] is not None) == planned
        if planned and spec is not None and spec.startswith("tq"):  # the first layer's codes: the same
            layer = min(cache.keys)  # (later layers' inputs may differ by an int8 rounding flip)
            for mine, theirs in ((planned_cache.keys, cache.keys), (planned_cache.values, cache.values)):
                assert torch.equal(mine[layer][0], theirs[layer][0]) and torch.equal(mine[layer][1], theirs[layer][1])

    ids = torch.randint(0, 384, (1, 25), generator=_gen(11))
    assert_same_steps(*_plan_and_modules(quantized_gemma3, monkeypatch, spec, ids, same_codes))


def _plan_and_modules(model, monkeypatch, spec, ids: torch.Tensor, check) -> tuple[torch.Tensor, torch.Tensor]:
    """(planned, modules' logits) of ids[5:] decoded one at a time after a prefill of ids[:5]: the modules
    decode, and at each step a copy of their cache takes the plan; check(planned cache, cache) each step."""
    import copy

    from wren import decode_plan
    from wren.kv import make_kv_cache

    got, expected = [], []
    with torch.inference_mode():
        cache = make_kv_cache(model, batch=1, max_len=ids.shape[1], spec=spec)
        monkeypatch.setattr(decode_plan, "ENABLED", False)  # (a prompt's chunk would take a plan too)
        model(ids[:, :5], cache, logits_to_keep=1)
        monkeypatch.setattr(decode_plan, "ENABLED", True)
        for i in range(5, ids.shape[1]):  # past the window of 6
            planned_cache = copy.deepcopy(cache)
            got.append(model(ids[:, i:i + 1], planned_cache))
            monkeypatch.setattr(decode_plan, "ENABLED", False)
            expected.append(model(ids[:, i:i + 1], cache))
            monkeypatch.setattr(decode_plan, "ENABLED", True)
            check(planned_cache, cache)
    assert not hasattr(cache, "_decode_plan")
    return torch.cat(got, 1), torch.cat(expected, 1)


@pytest.fixture(scope="module", params=["e2b", "e4b-k=v"])
def quantized_gemma4(request, tmp_path_factory):
    """Gemma 4 at 4 bits with heads of 64 (128 on full layers) and widths the kernels take (groups of 64):
    E2B's layout (per-layer inputs, the last layers sharing K/V) and E4B's with K=V full layers (v is k's
    projection)."""
    import wren
    from gguf_writer import save_hf
    from tiny_models import gemma4_hf
    from wren.quant import folder

    shape, _, k_eq_v = request.param.partition("-")
    extra = {"attention_k_eq_v": True, "num_global_key_value_heads": 1} if k_eq_v else {}
    path = tmp_path_factory.mktemp(f"gemma4-{request.param}")
    save_hf(gemma4_hf(shape, seed=5, head_dim=64, hidden_size_per_layer_input=64, intermediate_size=128, **extra), path)
    model = wren.load(path)
    folder.quantize_model(model, bits=4, group=64, embed_bits=8)
    return model


@pytest.mark.parametrize("spec", [None, "f16", "tq4"])
def test_gemma4_decode_plan_computes_what_the_layers_compute(quantized_gemma4, monkeypatch, spec):
    """As for Gemma 3: KV-shared layers reading their source's cache, K=V, v's weightless norm, per-layer
    inputs, the layer scalar, proportional RoPE on full layers, all in the one call a layer."""

    def planned(planned_cache, cache):
        assert planned_cache._decode_plan[1] is not None

    ids = torch.randint(0, 384, (1, 20), generator=_gen(12))
    assert_same_steps(*_plan_and_modules(quantized_gemma4, monkeypatch, spec, ids, planned))


def assert_same_steps(got, expected, flip: float = 2e-2):
    """The same computation, to float rounding: the kernels' inputs are rounded to int8, so a 1e-7 difference
    (a sum taken in another order) now and then puts one on the other side of a rounding boundary, and that
    step's logits move by up to ~1% (once in 20 steps here, with heads of 64); the next steps, reading the
    same cache, agree again. Most steps must agree to float rounding, none may be off by more than a flip
    (`flip`: larger where a TurboQuant cache's 3-bit code of a key or value can flip too)."""
    per_step = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).flatten()
    assert per_step.median() < 1e-5 and per_step.max() < flip, per_step

needs_codes = pytest.mark.skipif(not native.available() or not native._native.codes_supported(),
                                 reason="no AVX-512 VBMI nor AVX2 here (the TurboQuant cache is decoded instead)")


@needs_codes
@pytest.mark.parametrize("types", [("tq4", "tq4"), ("tq3.5", "tq2.5"), ("tq3", "tq2")])
@pytest.mark.parametrize("d,heads,kv_heads,slots,window,softcap,padded", [
    (256, 4, 1, 37, None, None, False), (128, 8, 2, 300, 128, 50.0, True), (64, 2, 2, 5, 3, None, False)])
def test_attention_from_cache_codes_matches_attend(types, d, heads, kv_heads, slots, window, softcap, padded):
    from wren.kv import codec_for
    from wren.models.layers import Coded

    kc, vc = codec_for(types[0], d), codec_for(types[1], d)
    key_scale = torch.rand(d, generator=_gen(6)) + 0.5
    buffers = [c.encode(torch.randn(1, kv_heads, slots + 7, d, generator=_gen(i)) * s)
               for i, (c, s) in enumerate(((kc, key_scale), (vc, 1.0)))]
    keys, values = (Coded(tuple(p[:, :, :slots] for p in parts), c, s)  # a longer buffer: strides
                    for parts, c, s in zip(buffers, (kc, vc), (key_scale, None)))
    q = torch.randn(1, heads, 1, d, generator=_gen(7))
    key_pos = torch.randperm(slots, generator=_gen(4))  # a ring holds positions out of order
    key_pos[:2] = -1
    position = int(key_pos.max())
    valid = (torch.rand(1, slots, generator=_gen(5)) > 0.2) if padded else None
    if d == 64 and "tq3.5" in types:
        assert not native.attends_codes(q, keys, values)  # the 4-/3-bit split of 64 is inside a chunk
        return
    assert native.attends_codes(q, keys, values)
    got = native.attend_codes(q, keys, values, key_pos, valid, position, window, d ** -0.5, softcap)
    mask = attention_mask(torch.tensor([[position]]), key_pos[None], window, valid)
    expected = attend(q, keys.in_frame(torch.float32), values.in_frame(torch.float32), mask, d ** -0.5, softcap)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@needs_codes
@pytest.mark.parametrize("name", ["tq4", "tq3.5", "tq3", "tq2.5", "tq2"])
@pytest.mark.parametrize("d", [128, 256])
def test_cache_codes_encode_and_decode_in_one_call_as_the_codec_does(name, d, monkeypatch):
    """The compiled encode (what the decode plan writes) gives the codes and scales of the codec's PyTorch
    steps (nearest centroid by bucketize, bit packing, least-squares scale); the compiled decode gives
    decode_rotated's centroids; bit for bit."""
    from wren.kv import codec_for
    from wren.quant.turboquant import decode_rotated

    codec = codec_for(name, d)
    x = torch.randn(3, 40, d, generator=_gen(d)) * 3
    assert native.encodes(x, codec.cfg)
    codes, scales = codec.encode(x)
    monkeypatch.setattr(native, "encodes", lambda *a: False)
    want_codes, want_scales = codec.encode(x)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    assert torch.equal(native.decode_rows(codes[:, 5:30], codec.cfg), decode_rotated(codes[:, 5:30], codec.cfg))


def _check_attention_from_codes(model, spec, monkeypatch):
    """Decode 20 tokens one at a time; every layer of every decoded token must attend from the codes and give
    what `attend` gives on the same cache decoded (compared call by call: over steps, int8 rounding flips of
    the next matmuls' inputs would change the codes written after). Then, with the kernel off, none may."""
    from wren.kv import cache as kv_cache

    errors = []
    real = native.attend_codes

    def checked(q, keys, values, key_pos, key_valid, position, window, scale, softcap):
        got = real(q, keys, values, key_pos, key_valid, position, window, scale, softcap)
        mask = attention_mask(torch.tensor([[position]]), key_pos[None], window, key_valid)
        expected = attend(q, keys.in_frame(q.dtype), values.in_frame(q.dtype), mask, scale, softcap)
        errors.append(((got - expected).norm() / expected.norm()).item())
        return got

    monkeypatch.setattr(native, "attend_codes", checked)
    _decode(model, spec)
    assert len(errors) == 20 * len(model.layers) and max(errors) < 1e-5
    monkeypatch.setattr(kv_cache.native, "reads_cache_codes", lambda cfg: False)  # decoded, then `attend`
    _decode(model, spec)
    assert len(errors) == 20 * len(model.layers)


@needs_codes
@pytest.mark.parametrize("spec", ["tq4", "tq3/tq2"])  # (3.5 bits of 64 split inside a chunk)
def test_a_turboquant_cache_is_read_from_its_codes_when_decoding(quantized_gemma3, monkeypatch, spec):
    """The modules' path (the decode plan off; what Gemma 4 and the plan's misfits run)."""
    from wren import decode_plan

    monkeypatch.setattr(decode_plan, "ENABLED", False)
    _check_attention_from_codes(quantized_gemma3, spec, monkeypatch)


@needs_codes
def test_gemma4_reads_a_turboquant_cache_from_its_codes(tmp_path, monkeypatch):
    """Gemma 4 (E2B shape: per-layer embeddings, layers reading another layer's keys and values), heads of
    64 and 128."""
    import wren
    from gguf_writer import save_hf
    from tiny_models import gemma4_hf

    save_hf(gemma4_hf("e2b", seed=4, head_dim=64), tmp_path)
    _check_attention_from_codes(wren.load(tmp_path), "tq4", monkeypatch)


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


@pytest.mark.parametrize("spec", [None, "f16", pytest.param("tq4/tq3", marks=needs_codes)])
def test_a_slot_cache_row_decodes_through_the_plan_as_a_cache_of_its_own(quantized_gemma3, spec):
    """The server's slot cache (dense, or wren.kv's compressed one): a step that decodes one row takes a plan on
    that row's buffers (decode_plan.SlotRow), and computes exactly what the plan computes on a cache of one
    sequence holding the same keys, values and positions: a row past its sliding window, and a reused row
    cut back to a prefix. A step that decodes both rows (in either order) runs them together
    (decode_plan.RowsPlan) and computes exactly what each row's own plan does."""
    import copy

    from wren import decode_plan
    from wren.kv import make_kv_cache, make_slot_cache, resolve_types

    model = quantized_gemma3
    slots = make_slot_cache(model, 3, 64, resolve_types(model, spec))
    ids = torch.randint(0, 384, (1, 40), generator=_gen(5))

    def parts(t):  # a layer's buffers: one tensor, or a compressed cache's tuple of them
        return t if isinstance(t, tuple) else (t,)

    with torch.inference_mode():
        slots.select([1])
        model(ids[:, :20], slots, logits_to_keep=1)  # past the window of 6: the sliding layers' rings wrap
        slots.select([0])
        model(ids[:, :9], slots, logits_to_keep=1)
        slots.truncate(0, 4)  # reused: positions 4-8 are stale
        own = {}
        for row in (0, 1):
            own[row] = make_kv_cache(model, batch=1, max_len=64, spec=spec)
            for layer in own[row].slot_pos:
                for mine, theirs in ((own[row].keys, slots.keys), (own[row].values, slots.values)):
                    for a, b in zip(parts(mine[layer]), parts(theirs[layer])):
                        a.copy_(b[row:row + 1])
                own[row].slot_pos[layer].copy_(slots.slot_pos[layer][row])
            own[row].length = slots.lengths[row]
        for t in ids[0, 20:30]:
            for row in (1, 0):
                slots.select([row])
                got = model(t.view(1, 1), slots)
                assert torch.equal(got, model(t.view(1, 1), own[row]))
        for rows in ([0, 1], [1, 0]):
            for t in ids[0, 30:34]:
                slots.select(rows)
                got = model(torch.stack([t, t + 1])[:, None], slots)
                assert isinstance(slots._rows_plan, decode_plan.RowsPlan)
                for i, row in enumerate(rows):
                    assert torch.equal(got[i:i + 1], model((t + i).view(1, 1), own[row]))
        for row in (0, 1):
            assert slots._row_plans[row][1] is not None and own[row]._decode_plan[1] is not None
            assert all(torch.equal(a[row], b[0]) for layer in own[row].slot_pos
                       for a, b in zip(parts(slots.keys[layer]), parts(own[row].keys[layer])))
        slots.select([0, 1])
        assert decode_plan.plan_for(model, slots, ids[:, :1]) is None  # (ids of one row for two rows)
        assert decode_plan.plan_for(model, slots, torch.zeros(2, 2, dtype=torch.long)) is None  # (prefill)
        copied = copy.deepcopy(slots).__dict__  # a copy's plans would point at these buffers
        assert "_row_plans" not in copied and "_rows_plan" not in copied


@pytest.mark.parametrize("spec", [None, pytest.param("tq4", marks=needs_codes)])
def test_gemma4_server_rows_decode_together_as_the_modules_do(quantized_gemma4, monkeypatch, spec):
    """Three rows of a Gemma 4 slot cache at different lengths, each decoding a token a step in one RowsPlan:
    each row's own per-layer inputs, KV-shared layers reading the row's source cache; against the modules on
    a copy of the same cache, step by step."""
    import copy

    from wren import decode_plan
    from wren.kv import make_slot_cache, resolve_types

    model = quantized_gemma4
    slots = make_slot_cache(model, 4, 64, resolve_types(model, spec))
    ids = torch.randint(0, 384, (3, 30), generator=_gen(8))
    got, expected = [], []
    with torch.inference_mode():
        for row, length in ((0, 9), (2, 4), (3, 13)):
            slots.select([row])
            model(ids[row % 3:row % 3 + 1, :length], slots, logits_to_keep=1)
        for i in range(14, 24):
            slots.select([3, 0, 2])
            modules_cache = copy.deepcopy(slots)
            got.append(model(ids[:, i:i + 1], slots))
            assert isinstance(slots._rows_plan, decode_plan.RowsPlan)
            monkeypatch.setattr(decode_plan, "ENABLED", False)
            expected.append(model(ids[:, i:i + 1], modules_cache))
            monkeypatch.setattr(decode_plan, "ENABLED", True)
    assert_same_steps(torch.cat(got, 1), torch.cat(expected, 1))


def _chunks_against_modules(model, monkeypatch, cache, ids: torch.Tensor, bounds, planned, flip=2e-2) -> None:
    """Each chunk ids[:, a:b] (a row of a slot cache: (row, a, b)) on the cache, and by the modules on a copy of
    it; planned(a, b) says whether the chunk must take a ChunkPlan. Every position's logits must agree."""
    import copy

    from wren import decode_plan

    got, expected = [], []
    with torch.inference_mode():
        for row, a, b in bounds:
            if row is not None:
                cache.select([row])
            modules_cache = copy.deepcopy(cache)
            plan = decode_plan.plan_for(model, cache, ids[:, a:b])
            assert isinstance(plan, decode_plan.ChunkPlan) == planned(a, b), (a, b)
            got.append(model(ids[:, a:b], cache))
            monkeypatch.setattr(decode_plan, "ENABLED", False)
            expected.append(model(ids[:, a:b], modules_cache))
            monkeypatch.setattr(decode_plan, "ENABLED", True)
    assert_same_steps(torch.cat(got, 1), torch.cat(expected, 1), flip)


@pytest.mark.parametrize("spec", [None, "f16", pytest.param("tq4", marks=needs_codes)])
def test_a_prompt_chunk_takes_the_plan_and_computes_what_the_layers_compute(quantized_gemma3, monkeypatch, spec):
    """A prompt's chunk of up to CHUNK_PLAN_MAX tokens runs as one compiled call a layer (decode_plan.ChunkPlan:
    its tokens in order, each written into the cache before it attends): every position's logits are the
    modules', for a first chunk, one that wraps the sliding layers' ring (window 6) within itself, and a
    decoded token after them; a longer chunk runs the modules."""
    from wren import decode_plan
    from wren.kv import make_kv_cache

    monkeypatch.setattr(decode_plan, "CHUNK_PLAN_MAX", 12)
    ids = torch.randint(0, 384, (1, 40), generator=_gen(13))
    cache = make_kv_cache(quantized_gemma3, batch=1, max_len=48, spec=spec)
    bounds = [(None, 0, 5), (None, 5, 17), (None, 17, 18), (None, 18, 31), (None, 31, 40)]
    _chunks_against_modules(quantized_gemma3, monkeypatch, cache, ids, bounds, lambda a, b: 1 < b - a <= 12)


@pytest.mark.parametrize("spec", [None, pytest.param("tq4/tq3", marks=needs_codes)])
def test_a_server_row_prefills_through_the_plan(quantized_gemma3, monkeypatch, spec):
    """The server prefills a request's chunk into its row of the slot cache: a ChunkPlan on that row's buffers;
    rows at different lengths, one of them past the sliding window."""
    from wren.kv import make_slot_cache, resolve_types

    slots = make_slot_cache(quantized_gemma3, 3, 48, resolve_types(quantized_gemma3, spec))
    ids = torch.randint(0, 384, (1, 30), generator=_gen(14))
    bounds = [(1, 0, 9), (0, 0, 4), (2, 0, 2), (1, 9, 20), (0, 4, 12)]
    # (tq3 values: on an AVX2 CPU, where sums are reduced in another order, 3-4 steps of 30 flip a code,
    # by 1.4-3.5%; the rest agree to 3e-7)
    _chunks_against_modules(quantized_gemma3, monkeypatch, slots, ids, bounds, lambda a, b: True,
                            flip=2e-2 if spec is None else 5e-2)


@pytest.mark.parametrize("spec", [None, pytest.param("tq4", marks=needs_codes)])
def test_gemma4_prompt_chunks_take_the_plan_until_a_shared_ring_would_wrap(quantized_gemma4, monkeypatch, spec):
    """Gemma 4's chunks: each token its own per-layer inputs. A KV-shared layer reads its source's cache after
    the whole chunk was written there, so a chunk takes the plan only while the sliding rings such layers read
    (window 6) keep every position its tokens see: up to position 6; after that the modules run."""
    from wren.kv import make_kv_cache

    ids = torch.randint(0, 384, (1, 14), generator=_gen(15))
    cache = make_kv_cache(quantized_gemma4, batch=1, max_len=16, spec=spec)
    bounds = [(None, 0, 4), (None, 4, 6), (None, 6, 9), (None, 9, 14)]
    _chunks_against_modules(quantized_gemma4, monkeypatch, cache, ids, bounds, lambda a, b: b <= 6)


def test_decode_layer_refuses_rows_wider_than_its_stack_buffers():
    layout = native._native.plan_layout()
    plan = torch.zeros(layout["fields"], dtype=torch.int64)
    plan[layout["hidden"]], plan[layout["head_dim"]] = native.MAX_WIDTH + 64, 64  # Gemma 3 27B's 5376 is wider
    floats = torch.zeros(layout["float_fields"], dtype=torch.float64)
    with pytest.raises(ValueError, match="up to 4096"):
        native._native.decode_layer(plan.data_ptr(), floats.data_ptr(), 0, 0, 0, 0, 1)
