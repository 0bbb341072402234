"""The CUDA path's small fused kernels (wren/triton_ops.py) against the PyTorch ops they replace, run by
Triton's CPU interpreter; and the fallback when a kernel fails on a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

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
                        ref = norm.by_ops(x, residual)
                        got = triton_ops.rms_norm(x, norm.weight, norm.offset, norm.eps, residual=residual)
                        assert got.dtype == dtype
                        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                        assert err < tol, (dtype, dim, offset, residual is None, err)
                    pos = torch.tensor([[5, 6, 7], [0, 1, 2]])
                    cos, sin = rope_cos_sin(pos, rope_inv_freq(dim, dim // 2, 10000.0), dtype)
                    ref = apply_rope(norm.by_ops(x), cos, sin)
                    got = triton_ops.rms_norm(x, norm.weight, norm.offset, norm.eps, rope=(cos, sin))
                    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    assert err < tol, (dtype, dim, "rope", err)
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
    import torch

    assert not triton_ops.norms(torch.ones(2, 8), None)
