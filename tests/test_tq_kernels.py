"""The fast TurboQuant paths agree with the exact reference: the matmul Hadamard rotation, the CPU int8
path (within its documented ~1%; 1.5% for the compiled kernels, whose inputs are int8 too), and the Triton kernel (in Triton's interpreter on CPU when Triton is
installed, and on the GPU when there is one)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from wren import native
from wren.quant import cpu_kernels
from wren.quant.linear import TQLinear, reference_path
from wren.quant.turboquant import TQConfig, _centroids, _runs, decode_rotated, rotate, unrotate

HAVE_TRITON = importlib.util.find_spec("triton") is not None

CASES = [(4, 0, 640), (3, 128, 640), (2.5, 128, 256), (8, 0, 128), (3.5, 0, 640), (2, 0, 2048), (4, 64, 1152), (4, 8, 24)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dim", [96, 128, 640, 2048, 4096, 1152])
def test_matmul_rotation_equals_butterflies(dim):
    cfg = TQConfig(bits=4, dim=dim, seed=7)
    x = torch.randn(3, 5, dim, generator=_gen(dim))
    fast = cpu_kernels.rotate_fast(x, cfg)
    assert torch.allclose(fast, rotate(x, cfg.seed, block=cfg.block), atol=2e-5)
    assert torch.allclose(cpu_kernels.unrotate_fast(fast, cfg), x, atol=2e-5)
    assert torch.allclose(unrotate(fast, cfg.seed), x, atol=2e-5)


def _layer(bits, group, width, rows=96):
    w = torch.randn(rows, width, generator=_gen(width + rows))
    return TQLinear.from_dense(w, bits, group or width, seed=1)


@pytest.mark.parametrize("bits,group,width", CASES)
@pytest.mark.parametrize("batch", [1, 3, 40])
@pytest.mark.parametrize("read_codes", [True, False], ids=["codes", "levels"])
def test_cpu_int8_path_stays_near_the_reference(bits, group, width, batch, read_codes, monkeypatch):
    monkeypatch.setattr(native, "READ_CODES", read_codes)
    layer = _layer(bits, group, width)
    x = torch.randn(batch, width, generator=_gen(batch))
    with reference_path():
        ref = layer(x)
    fast = layer(x)
    # bf16 activations and int8 levels: the documented tolerance is 1% of the output's scale; the compiled
    # kernels' int8 activations (one scale per group) add ~0.6%, in quadrature.
    tolerance = 0.015 if native.supports(layer.cfg) else 0.01
    assert (fast - ref).norm() / ref.norm() < tolerance
    if layer.reads_codes():  # the compiled kernels read the packed codes: no int8 copy is made
        assert read_codes and layer._int8 is None and isinstance(layer.native_weight(), native.CodesWeight)
    else:
        assert layer._int8 is not None and layer._int8[0].dtype == torch.int8


needs_native = pytest.mark.skipif(not native.available(), reason="the compiled kernels are not built here "
                                  "(no C compiler at install) or this CPU has neither AVX-512 VNNI nor AVX2")


@needs_native
@pytest.mark.parametrize("group,width,column_scaled", [(128, 640, True), (64, 192, False), (2048, 2048, True)])
def test_native_input_is_the_rotation_to_int8_precision(group, width, column_scaled):
    cfg = TQConfig(bits=4, dim=group, seed=5)
    x = torch.randn(3, width, generator=_gen(width)) * torch.linspace(0.1, 10, width)  # uneven groups
    scale = torch.rand(width, generator=_gen(1)) + 0.5 if column_scaled else None
    q = native.quantize_input(x, cfg, scale)
    exact = cpu_kernels.rotate_fast((x if scale is None else x * scale).reshape(3, -1, group), cfg)
    values = q.values.float() - 128
    assert values.abs().max() <= 127
    got = values.reshape(3, -1, group) * q.scales[..., None]
    assert ((got - exact).abs() <= q.scales[..., None] * 0.5 + 1e-6).all()  # nearest on each group's own grid


@needs_native
@pytest.mark.parametrize("rows,out", [(1, 96), (5, 97), (32, 3), (2, 35), (8, 33), (19, 50)])  # and the row tail;
# from 8 rows the levels are transposed into tiles (LEVEL_TILE_ROWS), 8 rows at a time then one by one
def test_native_matmul_is_exact_on_its_int8_inputs(rows, out):
    cfg = TQConfig(bits=4, dim=128, seed=2)
    x = torch.randn(rows, 384, generator=_gen(rows))
    levels = torch.randint(-127, 128, (out, 384), generator=_gen(out), dtype=torch.int8)
    row_scales = (torch.rand(out, generator=_gen(9)) + 0.1).bfloat16()
    q = native.quantize_input(x, cfg, None)
    weight = native.Weight(levels, row_scales, 128)
    padded = torch.zeros(weight.sums.shape[0] * 16, 3)
    padded[:out] = 128 * levels.reshape(out, 3, 128).sum(-1).float()
    assert torch.equal(weight.sums, padded.reshape(-1, 16, 3).transpose(1, 2))
    xq = (q.values.double() - 128).reshape(rows, -1, 128) * q.scales.double()[..., None]
    expected = (xq.reshape(rows, 384) @ levels.double().T) * row_scales.double()
    got = weight.matmul(q)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


needs_codes = pytest.mark.skipif(not (native.available() and native._native.codes_supported()),
                                 reason="the compiled kernels are not built here, or no AVX-512 VBMI nor AVX2")


@needs_codes
# 4 bits in groups of 128 and 256: the nibble kernel of decode (one or two pairs of chunks a group); of 64: not it
@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 128), (4, 256), (4, 64), (5, 256), (6, 128), (3.5, 128),
                                        (2.5, 256)])
# decode (1), the server's decoded rows (2-8: read two at a time, then one), prefill (9 on: unpacked), row tails
@pytest.mark.parametrize("rows,out", [(1, 37), (2, 16), (3, 5), (8, 19), (9, 33), (17, 64)])
def test_codes_matmul_is_exact_on_its_int8_inputs(bits, group, rows, out):
    """The packed-codes kernel computes step * sum_g scale_g * xs_g * <centroid levels, int8 input> exactly."""
    width = 2 * group
    layer = TQLinear.from_dense(torch.randn(out, width, generator=_gen(out)), bits, group, seed=3)
    x = torch.randn(rows, width, generator=_gen(rows))
    q = native.quantize_input(x, layer.cfg, None)
    weight = layer.native_weight()
    assert isinstance(weight, native.CodesWeight)
    centroids = decode_rotated(layer.codes, layer.cfg).double()  # [out, groups, group]
    runs = _runs(bits, group)
    step = max(_centroids(b, group, "beta", torch.device("cpu"))[0].abs().max().item() for *_, b in runs) / 127
    step = torch.tensor(step, dtype=torch.float32).double()  # the kernel keeps it in float32
    levels = torch.round(centroids / step)
    xq = (q.values.double() - 128).reshape(rows, 1, -1, group) * q.scales.double()[:, None, :, None]
    per_group = (xq * levels[None]).sum(-1) * layer.scales.double()[None]  # [rows, out, groups]
    expected = per_group.sum(-1) * step
    got = weight.matmul(q).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_codes
def test_codes_are_read_only_where_the_kernel_takes_them():
    assert native.CodesWeight.layout(TQConfig(bits=4, dim=128)) is not None
    assert native.CodesWeight.layout(TQConfig(bits=8, dim=128)) is None  # over 6 bits: the int8 levels
    assert native.CodesWeight.layout(TQConfig(bits=3.5, dim=64)) is None  # the 4-/3-bit split inside a chunk
    assert native.CodesWeight.layout(TQConfig(bits=4, dim=24)) is None  # groups of 64 or more only
    layer = _layer(4, 128, 640)
    layer.codes = layer.codes.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous: levels
    assert not layer.reads_codes() and isinstance(layer.native_weight(), native.Weight)


def test_gradients_reach_the_input_of_a_frozen_turboquant_layer():
    """Training (LoRA below a plain TurboQuant layer) needs d/dx; the compiled kernels have no backward."""
    from wren.quant.linear import linears

    layer, other = _layer(4, 128, 640), _layer(4, 128, 640, rows=64)
    x = torch.randn(40, 640, generator=_gen(6), requires_grad=True)
    (layer(x).sum() + sum(y.sum() for y in linears(x, (layer, other)))).backward()
    with reference_path():
        expected = 2 * layer.dense().sum(0) + other.dense().sum(0)
    assert x.grad is not None  # through the bf16 path: within its documented 1%
    assert (x.grad - expected).norm() / expected.expand_as(x.grad).norm() < 0.01


@pytest.mark.parametrize("compiled", [True, False])
def test_tables_first_built_in_inference_mode_serve_training(compiled, monkeypatch):
    """Rotation signs, Hadamard matrices and codebooks are cached; one first built during a decode step
    (inference mode) must still be usable where autograd records."""
    from wren.quant import turboquant

    for cached in (turboquant._hadamard_plan, turboquant._centroids, cpu_kernels._sylvester, native._signs):
        cached.cache_clear()
    layer = _layer(4, 128, 640)
    with torch.inference_mode(), monkeypatch.context() as patch:
        if not compiled:  # the matrix-product rotation (the Sylvester matrix) is what gets cached
            patch.setattr(native, "available", lambda: False)
        layer(torch.randn(3, 640, generator=_gen(7)))
    x = torch.randn(40, 640, generator=_gen(8), requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_native_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("WREN_NATIVE", "0")
    native.available.cache_clear()
    try:
        assert not native.available() and not native.supports(TQConfig(bits=4, dim=128))
        layer = _layer(4, 128, 640)  # still runs, on PyTorch's int8 kernel
        x = torch.randn(1, 640, generator=_gen(4))
        with reference_path():
            ref = layer(x)
        assert (layer(x) - ref).norm() / ref.norm() < 0.01
    finally:
        monkeypatch.delenv("WREN_NATIVE")
        native.available.cache_clear()


def test_int8_levels_fit_the_codebook_values():
    layer = _layer(4, 0, 640, rows=256)
    levels, scales = layer.int8_levels()
    with reference_path():
        exact = layer.rotated_weight(torch.float32)
    approx = levels.float() * scales.float().unsqueeze(-1)
    assert levels.abs().max() <= 127
    # Against the 4-bit quantization error itself (~0.0095 of the row's energy) this adds well under 1%.
    assert ((approx - exact).norm() / exact.norm()) ** 2 < 0.0095 * 0.01



def test_levels_written_in_pieces_are_the_whole_levels(tmp_path):
    """The level cache writes a weight's levels a piece of rows at a time (level_cache._write): the file
    must hold exactly what int8_levels builds whole, and a writer that makes the wrong rows must fail."""
    from wren.quant import level_cache
    from wren.weights.safetensors import SafetensorsFile

    layer = _layer(8, 128, 640, rows=2500)  # three pieces of 1024 rows, the last one short
    levels, scales = cpu_kernels.int8_levels(layer.codes, layer.scales, layer.cfg, layer.in_features)
    whole = decode_rotated(layer.codes, layer.cfg) * layer.scales.float().unsqueeze(-1)
    want_levels, want_scales = cpu_kernels.round_to_levels(whole.reshape(2500, 640))
    assert torch.equal(levels, want_levels) and torch.equal(scales, want_scales)
    pieces = list(cpu_kernels.int8_level_pieces(layer.codes, layer.scales, layer.cfg, layer.in_features))
    assert [start for start, *_ in pieces] == [0, 1024, 2048]
    level_cache._write(tmp_path / "c.safetensors", {"w": layer})
    f = SafetensorsFile(tmp_path / "c.safetensors")
    assert torch.equal(f.tensor("w.levels"), levels) and torch.equal(f.tensor("w.scales"), scales)
    items = [("w", torch.int8, (2500, 640), lambda: (lv for _, lv, _ in pieces[:2]))]
    with open(tmp_path / "short.safetensors", "wb") as out, pytest.raises(ValueError, match="made 2048 rows"):
        level_cache.write_aligned(out, items)

@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_triton_kernel_in_the_interpreter():
    """The kernel's bit unpacking and codebook lookup, run by Triton's CPU interpreter."""
    script = textwrap.dedent(f"""
        import torch
        from wren.quant import triton_kernels
        from wren.quant.linear import TQLinear, reference_path
        for bits, group, width in {CASES!r}:
            w = torch.randn(80, width, generator=torch.Generator().manual_seed(width))
            layer = TQLinear.from_dense(w, bits, group or width, seed=1)
            for batch in (1, 3, 8, 20):  # the GEMV (words, one row), and tl.dot
                x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))
                with reference_path():
                    ref = layer(x)
                y = triton_kernels.tq_linear(layer.rotate_input(x, fast=True), layer.codes, layer.scales, layer.cfg)
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, (bits, group, width, batch, err)
        print("ok")
    """)
    _interpret(script)


def _interpret(script: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_triton_row_gemv_in_the_interpreter():
    """Decode at batch 1: up to three matrices of one input in one launch (tq_row: rotated straight into the
    kernel's order, column scales folded in; tq_linears: an already rotated input), with either codebook
    lookup; each output equals its matrix's own product."""
    script = textwrap.dedent("""
        import torch
        from wren.quant import triton_kernels
        from wren.quant.linear import TQLinear, reference_path
        g = torch.Generator().manual_seed(0)
        # small outputs: the input split over programs, float32 sums added atomically; 4400 rows: each
        # program stores its own rows, in the activation's dtype (bf16 here too); rows past a block's end
        for pairs in (0, 1):
            triton_kernels.INTERPRETER_ROW["PAIRS"] = pairs
            for group, width, outs, dtype, tol, scaled in (
                    (128, 256, (96, 40, 40), torch.float32, 1e-5, False),
                    (0, 256, (64, 200), torch.float32, 1e-5, True),
                    (128, 256, (4400,), torch.float32, 1e-5, False),
                    (128, 256, (4000, 400), torch.bfloat16, 1e-2, True),
                    (64, 192, (33,), torch.float32, 1e-5, False)):
                layers = [TQLinear.from_dense(torch.randn(n, width, generator=g), 4, group or width, seed=2)
                          for n in outs]
                x = torch.randn(1, 1, width, generator=g)
                column = torch.rand(width, generator=g) + 0.5 if scaled else None
                weights = [(m.codes, m.scales) for m in layers]
                got = triton_kernels.tq_row(x.to(dtype), weights, layers[0].cfg, column)
                if column is None:
                    got_rotated = triton_kernels.tq_linears(layers[0].rotate_input(x, fast=True).to(dtype), weights,
                                                            layers[0].cfg)
                for i, m in enumerate(layers):
                    with reference_path():
                        ref = m(x if column is None else x * column)
                    for y in [got[i]] + ([got_rotated[i]] if column is None else []):
                        assert y.shape == ref.shape and y.dtype == dtype, (y.shape, ref.shape, y.dtype)
                        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                        assert err < tol, (pairs, outs, dtype, err)
        # every autotune config (tiles, warps, both lookups; rows and words past a tile's end)
        layer = TQLinear.from_dense(torch.randn(70, 640, generator=g), 4, 128, seed=2)
        x = torch.randn(1, 640, generator=g)
        with reference_path():
            ref = layer(x)
        xn = triton_kernels.nibble_major(layer.rotate_input(x, fast=True))
        words = [(triton_kernels._words(layer.codes), layer.scales)]
        for config in triton_kernels.row_configs():
            y = triton_kernels._gemv_row(xn, words, layer.cfg, torch.float32, False, config)
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-5, (config, err)
        print("ok")
    """)
    _interpret(script)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_triton_rotation_in_the_interpreter():
    """The CUDA path's activation rotation (one kernel; two where a group spans several Hadamard blocks)
    against the CPU's, with and without column scales, in float32 and bf16."""
    script = textwrap.dedent("""
        import torch
        from wren.models.layers import RMSNorm
        from wren.quant import cpu_kernels, triton_kernels
        from wren.quant.turboquant import TQConfig
        g = torch.Generator().manual_seed(0)
        for dim, block, width in [(128, None, 640), (640, None, 640), (32, 16, 96), (256, 64, 512)]:
            cfg = TQConfig(bits=4, dim=dim, seed=3, block=block)
            assert triton_kernels.rotates(cfg)
            for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 1e-2)):
                x = torch.randn(3, width, generator=g).to(dtype)
                for column in (None, torch.rand(width, generator=g) + 0.5):
                    xs = x.float() if column is None else x.float() * column
                    ref = cpu_kernels.rotate_fast(xs.reshape(3, width // dim, dim), cfg).reshape(3, width)
                    got = triton_kernels.rotate(x, cfg, column)
                    assert got.dtype == dtype
                    err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
                    assert err < tol, (dim, block, dtype, column is None, err)
                    nibbles = triton_kernels.rotate(x, cfg, column, nibble_major=True)  # the row GEMV's order
                    assert nibbles.dtype == torch.float32
                    expected = torch.cat([triton_kernels.nibble_major(r[None]) for r in got.float()])
                    assert torch.allclose(nibbles, expected, rtol=tol, atol=tol * ref.abs().max().item())
                    for norm in (RMSNorm(width, 1e-6), RMSNorm(width, 1e-6, offset=1.0), RMSNorm(width, 1e-6,
                                                                                               with_scale=False)):
                        if norm.weight is not None:  # (decode: one row, normed inside the rotation's kernel)
                            norm.weight.data = torch.rand(width, generator=g) + 0.5 - norm.offset
                        with torch.no_grad():
                            fused = triton_kernels.rotate(x[:1], cfg, column, nibble_major=True, norm=norm)
                            apart = triton_kernels.rotate(norm.by_ops(x[:1]), cfg, column, nibble_major=True)
                        err = ((fused - apart).abs().max() / apart.abs().max()).item()
                        assert err < tol, (dim, block, dtype, norm.offset, err)
                    up = torch.randn(1, width, generator=g).to(dtype)  # the MLP's middle, gelu(gate) * up, inside
                    fused = triton_kernels.rotate(x[:1], cfg, column, nibble_major=True, gelu_up=up)
                    middle = (torch.nn.functional.gelu(x[:1].float(), approximate="tanh") * up.float()).to(dtype)
                    apart = triton_kernels.rotate(middle, cfg, column, nibble_major=True)
                    err = ((fused - apart).abs().max() / apart.abs().max()).item()
                    assert err < tol, (dim, block, dtype, "gelu", err)
        assert not triton_kernels.rotates(TQConfig(bits=4, dim=512, seed=0))  # a 512 block: the matrix path
        print("ok")
    """)
    _interpret(script)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_residual_add_inside_the_rotation_in_the_interpreter():
    """A sublayer's end, residual + post_norm(h) (times Gemma 4's layer scalar), computed by the kernel
    that rotates the next projections' input (then normed, or not: E2B's per-layer gate): the rotation and
    the new residual stream it stores against the ops, rows wider than the kernel's 1024-value chunks and a
    group that spans Hadamard blocks too."""
    script = textwrap.dedent('''
        import torch
        from wren.models.layers import RMSNorm
        from wren.quant import triton_kernels
        from wren.quant.turboquant import TQConfig
        from wren.residual import Residual
        g = torch.Generator().manual_seed(1)
        for dim, block, width in [(128, None, 2560), (640, None, 640), (256, 64, 512)]:
            cfg = TQConfig(bits=4, dim=dim, seed=3, block=block)
            for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 1e-2)):
                h, residual = ((torch.randn(1, 1, width, generator=g) * size).to(dtype) for size in (4, 1))
                column = torch.rand(width, generator=g) + 0.5
                for offset, scale in ((0.0, None), (1.0, None), (0.0, torch.tensor([0.3]).to(dtype))):
                    post, pre = RMSNorm(width, 1e-6, offset=offset), RMSNorm(width, 1e-6, offset=offset)
                    post.weight.data = torch.rand(width, generator=g) + 0.5 - offset
                    pre.weight.data = torch.rand(width, generator=g) + 0.5 - offset
                    for norm in (pre, None):
                        with torch.no_grad():
                            pending = Residual(h, residual, post, scale)
                            fused = triton_kernels.rotate(h.reshape(1, width), cfg, column, nibble_major=True,
                                                          norm=norm, residual=pending)
                            value = post.by_ops(h, residual, scale)
                            first = value if norm is None else norm.by_ops(value)
                            apart = triton_kernels.rotate(first.reshape(1, width), cfg, column, nibble_major=True)
                        assert pending.computed.shape == h.shape and pending.computed.dtype == dtype
                        err = ((pending.computed.float() - value.float()).abs().max() / value.float().abs().max())
                        assert err.item() < 2 * tol, (dim, dtype, offset, "value", err)  # (two roundings apart)
                        err = ((fused - apart).abs().max() / apart.abs().max()).item()
                        assert err < tol, (dim, dtype, offset, norm is None, err)
        print("ok")
    ''')
    _interpret(script)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("bits,group,width", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_triton_kernel_on_the_gpu(bits, group, width, dtype, batch):
    from wren.quant import triton_kernels

    assert triton_kernels.available()
    w = torch.randn(300, width, generator=_gen(width + 300))
    layer = TQLinear.from_dense(w, bits, group or width, seed=1)
    x = torch.randn(batch, width, generator=_gen(2))
    with reference_path():
        ref = layer(x)
    # Codes quantized on the GPU are the CPU's codes bit for bit (Hadamard rotation, float64 norms).
    gpu = TQLinear.from_dense(w.cuda(), bits, group or width, seed=1)
    assert torch.equal(gpu.codes.cpu(), layer.codes) and torch.equal(gpu.scales.cpu(), layer.scales)
    y = gpu(x.cuda().to(dtype)).float().cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((y - ref).norm() / ref.norm()).item() < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["gemma3", "gemma4-e2b", "gemma4-26b"])
def test_quantized_tiny_model_on_the_gpu(tiny, name):
    import wren
    from wren.quant import folder

    model = wren.load(tiny[name][2])
    folder.quantize_model(model, bits=4, group=0, embed_bits=8)
    ids = torch.randint(0, 384, (2, 12), generator=_gen(3))
    with torch.no_grad(), reference_path():
        ref = model(ids)
    model.to("cuda")
    with torch.no_grad():
        got = model(ids.cuda()).cpu()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3
    assert wren.generate(model, "the tea", temperature=0, num_predict=4) is not None

