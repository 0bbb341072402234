"""The CUDA path's small fused kernels (wren/triton_ops.py) against the PyTorch ops they replace, run by
Triton's CPU interpreter; and the fallback when a kernel fails on a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from wren import triton_ops

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _interpret(script: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_rms_norm_kernel_in_the_interpreter():
    """Gemma 3's (1 + w) and Gemma 4's w and weightless norms; with a residual; with RoPE over heads."""
    _interpret("""
        import torch
        from wren import triton_ops
        from wren.models.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
        g = torch.Generator().manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            for dim, offset, with_scale in ((64, 1.0, True), (96, 0.0, True), (128, 0.0, False)):
                norm = RMSNorm(dim, 1e-6, offset=offset, with_scale=with_scale)
                if with_scale:
                    norm.weight.data = torch.rand(dim, generator=g) + 0.5 - offset
                x = (torch.randn(2, 3, 4, dim, generator=g) * 3).to(dtype)
                res = torch.randn(2, 3, 4, dim, generator=g).to(dtype)
                with torch.no_grad():
                    for residual in (None, res):
                        for scale in (None, torch.tensor([0.7]).to(dtype)):  # (Gemma 4's layer scalar)
                            ref = norm.by_ops(x, residual, scale)
                            got = triton_ops.rms_norm(x, norm.weight, norm.offset, norm.eps, residual=residual,
                                                      scale=scale)
                            assert got.dtype == dtype
                            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                            assert err < tol, (dtype, dim, offset, residual is None, scale is None, err)
                    pos = torch.tensor([[5, 6, 7], [0, 1, 2]])
                    cos, sin = rope_cos_sin(pos, rope_inv_freq(dim, dim // 2, 10000.0), dtype)
                    ref = apply_rope(norm.by_ops(x), cos, sin)
                    got = triton_ops.rms_norm(x, norm.weight, norm.offset, norm.eps, rope=(cos, sin))
                    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    assert err < tol, (dtype, dim, "rope", err)
        print("ok")
    """)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_decode_attention_kernel_in_the_interpreter():
    """One query a sequence over a cache: grouped heads, empty slots (position -1), left padding (valid),
    a sliding window, soft-capping, a query that sees nothing, K/V in another dtype than q."""
    _interpret("""
        import torch
        from wren import triton_ops
        from wren.models.layers import _attention_by_ops
        g = torch.Generator().manual_seed(0)
        cases = [  # (heads, kv heads, head dim, slots, window, softcap, q dtype, kv dtype, tolerance)
            (4, 1, 32, 70, None, None, torch.float32, torch.float32, 1e-5),
            (8, 2, 16, 40, 6, None, torch.float32, torch.float32, 1e-5),
            (2, 2, 64, 130, None, 30.0, torch.float32, torch.float32, 1e-5),
            (4, 2, 32, 50, None, None, torch.float16, torch.float16, 3e-3),  # (the interpreter's bf16 dot is wrong)
            (4, 1, 32, 50, 9, None, torch.float32, torch.float16, 3e-3),
        ]
        for h, hkv, d, slots, window, cap, qt, kt, tol in cases:
            b = 2
            q = torch.randn(b, 1, h, d, generator=g).to(qt).transpose(1, 2)  # [B, H, 1, D], as the models make it
            keys = torch.randn(b, hkv, slots, d, generator=g).to(kt)
            values = torch.randn(b, hkv, slots, d, generator=g).to(kt)
            key_pos = torch.arange(slots)
            key_pos[slots - 7:] = -1  # empty slots
            valid = torch.ones(b, slots, dtype=torch.bool)
            valid[1, :5] = False  # the second sequence is left-padded
            pos = torch.full((b, 1), slots - 10)
            for kv_valid in (None, valid):
                kv = (keys, values, key_pos, kv_valid)
                ref = _attention_by_ops(q, kv, pos, window, 0.3, cap)
                got = triton_ops.attend_one(q, keys, values, key_pos, kv_valid, pos, window, 0.3, cap)
                assert got.shape == ref.shape and got.dtype == qt
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                assert err < tol, (h, hkv, d, slots, window, cap, qt, kt, err)
        # a query before every cached position sees nothing: zeros, as attend's nan_to_num gives
        q = torch.randn(1, 2, 1, 16, generator=g)
        keys = torch.randn(1, 1, 20, 16, generator=g)
        got = triton_ops.attend_one(q, keys, keys, torch.arange(5, 25), None, torch.tensor([[2]]), None, 1.0, None)
        assert torch.equal(got, torch.zeros_like(got))
        print("ok")
    """)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_decode_attention_rotating_its_output_for_the_o_projection_in_the_interpreter():
    """The attention kernels (a dense cache, a TurboQuant cache's codes) that also rotate their output for a
    4-bit TurboQuant o projection (groups of one Hadamard block, whole groups a head; column scales or none),
    against the rotation's own kernel on the same output, and the o projection through them against the
    module: what `attend_project` does."""
    _interpret("""
        import torch
        from wren import triton_ops
        from wren.kv.codecs import codec_for
        from wren.models.layers import Coded, attend_project
        from wren.quant import triton_kernels
        from wren.quant.linear import TQLinear, input_rotation, reference_path
        g = torch.Generator().manual_seed(2)
        triton_ops.takes = lambda x: True
        for h, hkv, d, group, qt, tol in ((4, 1, 32, 16, torch.float32, 1e-5), (8, 2, 64, 64, torch.float32, 1e-5),
                                          (2, 2, 128, 32, torch.float16, 3e-3)):
            slots = 40
            q = torch.randn(1, 1, h, d, generator=g).to(qt).transpose(1, 2)
            keys, values = (torch.randn(1, hkv, slots, d, generator=g).to(qt) for _ in range(2))
            key_pos, pos = torch.arange(slots), torch.tensor([[30]])
            w = torch.randn(48, h * d, generator=g)
            for column in (None, torch.rand(h * d, generator=g) + 0.5):
                o_proj = TQLinear.from_dense(w, bits=4, group=group, seed=5, column_scale=column)
                scaled = column is not None
                with torch.no_grad():
                    rotation = input_rotation(o_proj, q, d)
                    assert rotation is not None
                    out, rotated = triton_ops.attend_one(q, keys, values, key_pos, None, pos, None, 0.2, None, rotation)
                    alone = triton_ops.attend_one(q, keys, values, key_pos, None, pos, None, 0.2, None)
                    assert torch.equal(out, alone)
                    apart = triton_kernels.rotate(out.reshape(1, -1), o_proj.cfg, o_proj.column_scale()[0],
                                                  nibble_major=True)
                    err = ((rotated - apart).abs().max() / apart.abs().max()).item()
                    assert rotated.shape == (1, h * d) and err < 1e-5, (h, d, group, err)
                    got = attend_project(o_proj, q, (keys, values, key_pos, None), pos, None, 0.2)
                    with reference_path():
                        ref = o_proj(out.float()).to(qt)
                    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    assert got.shape == (1, 1, 48) and got.dtype == qt and err < tol, (h, d, group, scaled, err)
            # the same over a TurboQuant cache's codes (attend_codes)
            kc = codec_for("tq4", d)
            coded = Coded(tuple(t.contiguous() for t in kc.encode(keys)), kc)
            with torch.no_grad():
                out, rotated = triton_ops.attend_codes(q, coded, coded, key_pos, None, pos, None, 0.2, None, rotation)
                assert torch.equal(out, triton_ops.attend_codes(q, coded, coded, key_pos, None, pos, None, 0.2, None))
                apart = triton_kernels.rotate(out.reshape(1, -1), o_proj.cfg, o_proj.column_scale()[0],
                                              nibble_major=True)
                assert ((rotated - apart).abs().max() / apart.abs().max()).item() < 1e-5
                got = attend_project(o_proj, q, (coded, coded, key_pos, None), pos, None, 0.2)
                with reference_path():
                    ref = o_proj(out.float()).to(qt)
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            assert got.shape == (1, 1, 48) and err < tol, (h, d, group, "codes", err)
        assert not triton_ops.broken, triton_ops.broken
        print("ok")
    """)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_decode_attention_from_cache_codes_in_the_interpreter():
    """A TurboQuant cache read from its codes (whole and fractional rates, keys scaled per channel or not,
    other rates for keys and values, float32 and float16 queries; the query's rotation into the keys' frame
    and the output's out of the values' inside the kernel) against decoding them and attending with the ops."""
    _interpret("""
        import torch
        from wren import triton_ops
        from wren.kv.cache import encode_keys
        from wren.kv.codecs import codec_for
        from wren.models.layers import Coded, _attention_by_ops
        g = torch.Generator().manual_seed(0)
        b, slots = 2, 45
        for kname, vname, h, hkv, d, window, dtype in (
                ("tq4", "tq4", 4, 1, 64, None, torch.float32), ("tq3.5", "tq2.5", 8, 2, 128, 7, torch.float32),
                ("tq3", "tq2", 2, 2, 32, None, torch.float32), ("tq4", "tq3", 4, 2, 64, 9, torch.float16),
                ("tq4", "tq4", 8, 1, 512, None, torch.float16)):  # (a 31B global layer's head size)
            kc, vc = codec_for(kname, d), codec_for(vname, d)
            key_scale = torch.rand(d, generator=g) + 0.5 if dtype == torch.float32 else None
            k = torch.randn(b, hkv, slots, d, generator=g)
            v = torch.randn(b, hkv, slots, d, generator=g)
            keys = Coded(tuple(t.contiguous() for t in encode_keys(kc, k, key_scale)), kc, key_scale)
            values = Coded(tuple(t.contiguous() for t in vc.encode(v)), vc)
            q = torch.randn(b, 1, h, d, generator=g).to(dtype).transpose(1, 2)
            key_pos = torch.arange(slots)
            key_pos[-4:] = -1
            valid = torch.ones(b, slots, dtype=torch.bool)
            valid[0, :3] = False
            pos = torch.full((b, 1), slots - 6)
            for kv_valid in (None, valid):
                kv = (keys, values, key_pos, kv_valid)
                ref = _attention_by_ops(q, kv, pos, window, d ** -0.5, None)
                got = triton_ops.attend_codes(q, keys, values, key_pos, kv_valid, pos, window, d ** -0.5, None)
                assert got.shape == ref.shape and got.dtype == q.dtype
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                assert err < (1e-5 if dtype == torch.float32 else 3e-3), (kname, vname, h, hkv, d, window, err)
        print("ok")
    """)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_gelu_mul_kernel_in_the_interpreter():
    _interpret("""
        import torch
        from wren import triton_ops
        from wren.models.layers import gelu_tanh
        k = triton_ops._kernels()["gelu_mul"]
        g = torch.Generator().manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            gate = (torch.randn(3, 1500, generator=g) * 4).to(dtype)
            up = torch.randn(3, 1500, generator=g).to(dtype)
            out = torch.empty_like(gate)
            k[(3,)](gate, up, out, gate.numel(), BLOCK=2048)
            ref = gelu_tanh(gate.float()) * up.float()
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (dtype, err)
        print("ok")
    """)


def test_a_failing_triton_kernel_falls_back_once_and_stays_off(monkeypatch):
    monkeypatch.setattr(triton_ops, "broken", {})
    launches = []

    def launch():
        launches.append(1)
        raise RuntimeError("PTX assembly failed")

    with pytest.warns(RuntimeWarning, match="_k failed here"):
        assert triton_ops.guarded("_k", launch, lambda: "slow") == "slow"
    assert triton_ops.guarded("_k", launch, lambda: "slow") == "slow"
    assert len(launches) == 1 and "PTX assembly failed" in triton_ops.broken["_k"]
    assert triton_ops.guarded("_other", lambda: "fast", lambda: "slow") == "fast"


def test_cpu_tensors_never_take_the_triton_path():
    assert not triton_ops.norms(torch.ones(2, 8), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_kernel_on_the_gpu(dtype):
    from wren.models.layers import _attention_by_ops

    g = torch.Generator().manual_seed(0)
    for h, hkv, d, slots, window in ((32, 16, 256, 300, 64), (32, 4, 512, 300, None), (8, 1, 256, 1000, None)):
        q = torch.randn(2, 1, h, d, generator=g).to(dtype).transpose(1, 2).cuda()
        keys, values = (torch.randn(2, hkv, slots, d, generator=g).to(dtype).cuda() for _ in range(2))
        key_pos = torch.arange(slots).cuda()
        key_pos[-20:] = -1
        pos = torch.full((2, 1), slots - 30).cuda()
        kv = (keys, values, key_pos, None)
        ref = _attention_by_ops(q, kv, pos, window, d ** -0.5, None)
        assert triton_ops.attends(q, keys, values)
        got = triton_ops.attend_one(q, keys, values, key_pos, None, pos, window, d ** -0.5, None)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rms_norm_kernel_on_the_gpu():
    from wren.models.layers import RMSNorm

    norm = RMSNorm(5376, 1e-6).cuda()
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5376, device="cuda", dtype=torch.bfloat16)
    assert triton_ops.norms(x, norm.weight)
    got = triton_ops.rms_norm(x, norm.weight, 0.0, 1e-6, residual=x)
    ref = norm.by_ops(x, x)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
@pytest.mark.parametrize("name,kv", [("gemma4-e2b", None), ("gemma3", "tq3.5"), ("gemma4-e4b", "tq4")])
def test_the_triton_decode_step_in_the_interpreter(tiny, name, kv):
    """The whole CUDA path of a quantized model's static decode step (rotation, grouped GEMV, norms, RoPE,
    attention from dense or TurboQuant caches, gelu, PLE rows handed in) run on CPU tensors by Triton's
    interpreter, against the same step on the exact float32 reference path (the Triton kernels do exact
    float32 arithmetic on the codebook values): every dispatch, shape and stride the GPU will see, short of
    the graph capture and the compiler."""
    _interpret(f"""
        import torch, wren
        from wren import triton_ops
        from wren.graphs import StaticDecoder
        from wren.kv import make_kv_cache
        from wren.quant import folder
        from wren.quant.linear import reference_path
        model = wren.load({str(tiny[name][1])!r})
        folder.quantize_model(model, bits=4, group=0, embed_bits=4, module_bits={{}})
        prompt = torch.randint(5, 384, (1, 5), generator=torch.Generator().manual_seed(4))
        cpu_path = triton_ops.takes
        calls = []

        def everywhere(x):
            calls.append(1)
            return True

        def run(triton):
            triton_ops.takes = everywhere if triton else cpu_path
            cache = make_kv_cache(model, batch=1, max_len=16, spec={kv!r})
            with torch.inference_mode():
                logits = model(prompt, cache, logits_to_keep=1)[:, -1]
                step = StaticDecoder(model, cache, graph=False)
                out = []
                for _ in range(4):
                    logits = step(logits.argmax(-1, keepdim=True)).clone()
                    out.append(logits)
            return out

        with reference_path():
            reference = run(False)
        interpreted = run(True)
        assert calls and not triton_ops.broken, triton_ops.broken
        for a, b in zip(reference, interpreted):
            err = ((a - b).abs().max() / a.abs().max()).item()
            assert err < 1e-4, err
        print("ok")
    """)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_every_kernel_of_the_decode_step_compiles_for_sm90():
    """The interpreter checks what the kernels compute, not that they compile: Triton's compiler and ptxas
    (shipped with Triton) build each kernel of the decode step (prefill, batch 1 and 8, f16 and tq4 caches;
    every autotune config) for an H100/H200 here, without a GPU (bench/gpu_compile.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    bench = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_compile.py")
    run = subprocess.run([sys.executable, bench, "--shapes", "tiny", "--check"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = {line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ")}
    assert {"_tq_gemv_row", "_tq_gemv", "_tq_aligned", "_hadamard_round", "rms_norm_kernel", "gelu_mul_kernel",
            "attend_one_kernel", "attend_codes_kernel", "kv_write_kernel", "qkv_norms_kernel"} <= compiled, compiled


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_head_norms_kernel_in_the_interpreter():
    """Gemma 4's q, k (RoPE'd) and v (weightless) head norms in one launch, read from the views of one GEMV
    output (a row stride a token), against the three norms it replaces; and for one token a sequence, the
    cache write the same kernel does (a full layer's slot, a ring's)."""
    _interpret("""
        import torch
        from wren import triton_ops
        from wren.models.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
        g = torch.Generator().manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            for hq, hkv, d in ((4, 1, 32), (8, 2, 64)):
                q_norm, k_norm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
                v_norm = RMSNorm(d, 1e-6, with_scale=False)
                q_norm.weight.data, k_norm.weight.data = torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g)
                out = (torch.randn(2, 3, (hq + 2 * hkv) * d, generator=g) * 3).to(dtype)  # one GEMV output
                q, k, v = (t.view(2, 3, -1, d) for t in out.split([hq * d, hkv * d, hkv * d], dim=-1))
                pos = torch.tensor([[5, 6, 7], [0, 1, 2]])
                cos, sin = rope_cos_sin(pos, rope_inv_freq(d, d // 2, 10000.0), dtype)
                triton_ops.takes = lambda x: True  # (the views as the CUDA path will see them)
                with torch.no_grad():
                    assert triton_ops.norms_qkv(q, k, v, q_norm.weight)
                    got = triton_ops.qkv_norms(q, k, v, q_norm, k_norm, cos, sin)
                    ref = (apply_rope(q_norm.by_ops(q), cos, sin), apply_rope(k_norm.by_ops(k), cos, sin),
                           v_norm.by_ops(v))
                for a, b, name in zip(got, ref, "qkv"):
                    assert a.shape == b.shape and a.dtype == dtype and a.is_contiguous()
                    err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                    assert err < tol, (dtype, hq, name, err)
                for window in (0, 4):  # one token a sequence, written into a full layer's slot or a ring's
                    keys, values = torch.zeros(2, hkv, 8, d, dtype=dtype), torch.zeros(2, hkv, 8, d, dtype=dtype)
                    slot_pos, pos = torch.full((8,), -1), torch.tensor([5])
                    one = [t[:, :1] for t in (q, k, v)]
                    with torch.no_grad():
                        got = triton_ops.qkv_norms(*one, q_norm, k_norm, cos[:, :1], sin[:, :1],
                                                   (keys, values, slot_pos, pos, window))
                    slot = 5 % window if window else 5
                    assert torch.equal(keys[:, :, slot], got[1][:, 0]) and torch.equal(values[:, :, slot], got[2][:, 0])
                    assert slot_pos.tolist() == [5 if i == slot else -1 for i in range(8)]
                    assert keys.abs().sum() == keys[:, :, slot].abs().sum() and values[:, :, :slot].abs().sum() == 0
        print("ok")
    """)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_rope_tables_kernel_in_the_interpreter():
    """A step's RoPE cos/sin tables in one kernel against the seven ops they replace: Gemma 4's partial
    ("proportional") frequencies too, positions far into a long context, a batch."""
    _interpret("""
        import torch
        from wren import triton_ops
        from wren.models import layers
        pos = torch.tensor([[0, 1, 2], [70000, 131071, 5]])
        for inv_freq in (layers.rope_inv_freq(256, 256, 10000.0), layers.rope_inv_freq(512, 128, 1e6, 8.0)):
            for dtype in (torch.float32, torch.bfloat16):
                triton_ops.takes = lambda x: True
                assert triton_ops.makes_rope_tables(pos, inv_freq)
                got = layers.rope_cos_sin(pos, inv_freq, dtype)
                ref = layers._rope_cos_sin_by_ops(pos, inv_freq, dtype)
                for a, b in zip(got, ref):
                    assert a.shape == b.shape == (2, 3, 2 * inv_freq.numel()) and a.dtype == dtype
                    assert (a.float() - b.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 8e-3)
        assert not triton_ops.broken, triton_ops.broken
        print("ok")
    """)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
def test_turboquant_cache_write_kernel_in_the_interpreter():
    """One token's key and value coded into a TurboQuant cache in one kernel (rotation, nearest centroids
    of each run, least-squares scale, bit packing, the slot's position) against the codecs' own encoding:
    the same bytes and scales; whole and fractional rates, key scales, a full layer's slot and a ring's."""
    _interpret("""
        import torch
        from wren import triton_ops
        from wren.kv import codecs
        triton_ops.takes = lambda x: True
        g = torch.Generator().manual_seed(0)
        for kname, vname, d in (("tq4", "tq4", 64), ("tq3.5", "tq3", 128), ("tq2.5", "tq4", 256), ("tq3", "tq2", 32)):
            kc, vc = codecs.TQ(kname, d), codecs.TQ(vname, d)
            for window, scaled in ((0, False), (4, True)):
                b, h, slots = 2, 3, 8
                keys, values = kc.empty((b, h, slots), "cpu"), vc.empty((b, h, slots), "cpu")
                slot_pos, pos = torch.full((slots,), -1), torch.tensor([5])
                k, v = (torch.randn(b, 1, h, d, generator=g).transpose(1, 2) for _ in range(2))
                key_scale = torch.rand(d, generator=g) + 0.5 if scaled else None
                assert triton_ops.encodes_kv(k, v, kc, vc, keys, values, pos)
                triton_ops.kv_encode(k, v, kc, vc, keys, values, slot_pos, pos, window, key_scale)
                slot = 5 % window if window else 5
                expected = (kc.encode(k.float() * key_scale if scaled else k), vc.encode(v))
                for (codes, scales), (want_codes, want_scales) in zip((keys, values), expected):
                    assert torch.equal(codes[:, :, slot], want_codes[:, :, 0]), (kname, vname, d)
                    assert torch.equal(scales[:, :, slot], want_scales[:, :, 0]), (kname, vname, d)
                    assert codes.sum() == codes[:, :, slot].sum() and scales.abs().sum() == scales[:, :, slot].abs().sum()
                assert slot_pos.tolist() == [5 if i == slot else -1 for i in range(slots)]
        print("ok")
    """)
