"""The static decode step (graphs.StaticDecoder): the same logits as the ordinary step, token after token.

On the CPU it runs eagerly, which checks what the CUDA graph records: the position read from the cache's
device tensor, full layers attending over every slot with the empty ones masked, the PLE rows handed in.
The capture itself needs a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wren
from wren.errors import ContextLengthError
from wren.graphs import StaticDecoder, decode_step, graphable
from wren.kv import make_kv_cache
from wren.quant import folder


def _steps(model, kv, prompts: torch.Tensor, steps: int, static: bool, graph: bool = False,
           max_len: int = 40) -> list[torch.Tensor]:
    """Logits of `steps` greedy tokens after prefilling `prompts`, with the static (captured in a CUDA graph
    if `graph`) or the ordinary step."""
    cache = make_kv_cache(model, batch=prompts.shape[0], max_len=max_len, spec=kv)
    with torch.inference_mode():
        logits = model(prompts, cache, logits_to_keep=1)[:, -1]
        step = StaticDecoder(model, cache, graph=graph) if static else (
            lambda ids: model(ids, cache, logits_to_keep=1)[:, -1])
        out = []
        for _ in range(steps):
            ids = logits.argmax(-1, keepdim=True)
            logits = step(ids).clone()
            out.append(logits)
    assert cache.length == prompts.shape[1] + steps
    return out


@pytest.mark.parametrize("name", ["gemma3", "gemma4-e2b", "gemma4-e4b"])
@pytest.mark.parametrize("kv", [None, "q8", "tq4"])
def test_static_step_matches_the_ordinary_step(tiny, name, kv):
    model = wren.load(tiny[name][1])
    # two sequences (no decode plan: the modules' own step on both sides), past the sliding window of 6
    prompts = torch.randint(5, 384, (2, 9), generator=torch.Generator().manual_seed(1))
    ordinary = _steps(model, kv, prompts, 8, static=False)
    static = _steps(model, kv, prompts, 8, static=True)
    # Full layers attend over all 40 slots instead of the positions so far: the same scores, summed in
    # another order (~1e-6), which these random models amplify up to ~1e-3 on some steps (the ordinary step
    # is as far from a full forward there); a wrong mask or position is off by whole units.
    for a, b in zip(ordinary, static):
        assert torch.allclose(a, b, atol=2e-3, rtol=1e-4), (a - b).abs().max()


def test_static_step_of_a_quantized_model_with_ple(tiny):
    """Gemma 4 with per-layer embeddings at TurboQuant 4 bits, one sequence (the CPU's fast kernels)."""
    model = wren.load(tiny["gemma4-e2b"][1])
    folder.quantize_model(model, bits=4, group=0, embed_bits=8)
    prompts = torch.randint(5, 384, (1, 7), generator=torch.Generator().manual_seed(2))
    ordinary = _steps(model, None, prompts, 6, static=False)
    static = _steps(model, None, prompts, 6, static=True)
    for a, b in zip(ordinary, static):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()


def test_static_step_stops_at_the_context(tiny):
    model = wren.load(tiny["gemma3"][1])
    cache = make_kv_cache(model, batch=1, max_len=4)
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), cache)
        step = StaticDecoder(model, cache, graph=False)
        step(torch.tensor([[8]]))
        with pytest.raises(ContextLengthError):
            step(torch.tensor([[9]]))
    assert cache.length == 4


def test_cpu_steps_are_not_captured(tiny):
    model = wren.load(tiny["gemma3"][1])
    cache = make_kv_cache(model, batch=1, max_len=8)
    assert not graphable(model, cache)
    assert not isinstance(decode_step(model, cache), StaticDecoder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["gemma3", "gemma4-e2b"])
def test_captured_step_matches_the_ordinary_step_on_the_gpu(tiny, name):
    model = wren.load(tiny[name][1]).to("cuda")
    folder.quantize_model(model, bits=4, group=0, embed_bits=8)
    prompts = torch.randint(5, 384, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    cache = make_kv_cache(model, batch=2, max_len=40)
    assert graphable(model, cache)
    ordinary = _steps(model, None, prompts, 8, static=False)
    captured = _steps(model, None, prompts, 8, static=True, graph=True)
    for a, b in zip(ordinary, captured):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()


def test_gpu_bench_runs_on_a_tiny_shape(tmp_path):
    """bench/gpu_decode.py, the GPU table's script, end to end on the CPU: it must not rot between the
    sessions that are lent a GPU. wren's bf16 logits equal transformers' there (same tensors, same ops)."""
    out = tmp_path / "rows.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_decode.py"
    run = subprocess.run([sys.executable, str(script), "--shapes", "tiny", "--device", "cpu", "--batch", "1", "2",
                          "--tokens", "3", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["batch"]) for r in rows] == [("tiny", 1), ("tiny", 2)]
    for r in rows:
        assert r["wren_tok_s"] > 0 and r["transformers_tok_s"] > 0 and r["limit_425_tok_s"] > 0
        assert r["logit_distance_bf16"] < 1e-2
    assert "| tiny | 2 |" in run.stdout


def test_a_step_that_cannot_be_captured_runs_eagerly(tiny):
    """Capture fails (here: no CUDA at all): a warning, then the same logits from the eager static step."""
    model = wren.load(tiny["gemma3"][1])
    prompts = torch.randint(5, 384, (2, 5), generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        captured = _steps(model, None, prompts, 3, static=True, graph=True)
    eager = _steps(model, None, prompts, 3, static=True, graph=False)
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,kv", [("gemma3", None), ("gemma4-e2b", "tq4")])
def test_generation_through_the_static_step(tiny, name, kv, monkeypatch):
    """Generation as it runs on a GPU (every decode step through a StaticDecoder, eager here): a left-padded
    batch whose first row stops early gives the tokens the ordinary step gives."""
    from wren import generation
    from wren.sampling import Options

    model = wren.load(tiny[name][1])
    prompts = [[2, *range(40, 52)], [2, 50, 51, 52]]  # longer than the window, left-padded

    def tokens():
        opts = Options(temperature=0, repeat_penalty=1.0, num_predict=8)
        first = [t for (t, _) in generation.Generation(model, prompts, opts, set(), kv_cache=kv)][2]
        rows = [[], []]
        for step in generation.Generation(model, prompts, opts, {first}, kv_cache=kv):  # row 0 stops at step 3
            for row, token in enumerate(step):
                rows[row].append(token)
        return first, rows

    ordinary = tokens()
    made = []
    monkeypatch.setattr(generation, "decode_step",
                        lambda m, cache: made.append(1) or StaticDecoder(m, cache, graph=False))
    static = tokens()
    assert made and static == ordinary
    assert None in ordinary[1][0]  # the stop was hit
