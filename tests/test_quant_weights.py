"""TurboQuant weight compression end to end on tiny models: quantize, save, load, generate; the CLI's
quantize and perplexity commands; the error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import wren
from wren.errors import BadOptionError
from wren.quant import folder
from wren.quant.linear import TQLinear, quantize_weight, reference_path
from wren.quant.experts import TQExperts
from wren.quant.tables import TQRowTable


def test_tq_linear_matches_its_dequantized_weight():
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    layer = TQLinear.from_dense(w, bits=4, group=128, seed=3)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    # The rotated matmul equals a plain matmul with the de-rotated (dequantized) weight.
    with reference_path():
        assert torch.allclose(layer(x), x @ layer.dense().T, atol=1e-4)
    rel = ((layer.dense() - w).norm() / w.norm()) ** 2
    assert rel < 0.0095 * 1.15  # TQ_mse's 4-bit distortion, with a fitted scale per group
    assert layer.bits_per_weight() == pytest.approx(4 + 16 / 128)


def test_group_must_divide_width():
    with pytest.raises(BadOptionError):
        quantize_weight(torch.randn(4, 100), 4, 64, 0)


@pytest.mark.parametrize("name,group", [("gemma3", 32), ("gemma4-e2b", 32), ("gemma4-26b", 32), ("gemma3", 0)])
def test_quantized_folder_round_trip(tiny, tmp_path, name, group):
    _, hf_folder, gguf_path = tiny[name]
    model = wren.load(gguf_path)
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids)
    folder.quantize_model(model, bits=8, group=group, embed_bits=8)
    with torch.no_grad():
        in_memory = model(ids)
    out = folder.save(model, tmp_path / "q")
    loaded = wren.load(out)
    assert isinstance(loaded.layers[0].mlp.gate_proj, TQLinear)
    with torch.no_grad():
        reloaded = loaded(ids)
    assert torch.allclose(reloaded, in_memory, atol=1e-4)
    assert (reloaded.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9  # 8 bits: nearly lossless
    assert folder.linear_bits_per_weight(loaded) == pytest.approx(8 + 16 / (group or 64), abs=0.6)
    assert wren.generate(loaded, "the tea", temperature=0, num_predict=4) is not None
    if name == "gemma4-26b":  # the MoE experts are codes too
        assert isinstance(loaded.layers[0].experts, TQExperts)
    if name == "gemma4-e2b":  # the PLE table is stored as codes too, and looked up row by row
        table = loaded.embed_tokens_per_layer
        assert isinstance(table, TQRowTable) and table.bits == 8
        rows = table.lookup(ids[:1, :3], "cpu", torch.float32)
        assert rows.shape == (1, 3, table.width)


def test_cpu_levels_are_written_once_then_mapped(tiny, tmp_path, monkeypatch):
    """The CPU matmul's int8 levels of a loaded folder come from the level cache: written by the first
    load, mapped by the next, rewritten when corrupt, and always the levels the codes give."""
    from wren.quant import cpu_kernels, level_cache

    monkeypatch.setenv("WREN_LEVEL_CACHE", str(tmp_path / "levels"))
    model = wren.load(tiny["gemma3"][2])
    folder.quantize_model(model, bits=4, group=32, embed_bits=8)
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids)  # levels built in memory
    out = folder.save(model, tmp_path / "q")
    wren.load(out)
    [cached] = (tmp_path / "levels").glob("*.safetensors")
    stamp = cached.stat().st_mtime_ns
    for attempt in ("mapped", "corrupt"):
        loaded = wren.load(out)
        for name, m in level_cache.fast_modules(loaded).items():
            assert m._int8 is not None, name  # in place before the first forward
            fresh = cpu_kernels.int8_levels(m.codes, m.scales, m.cfg, m.in_features)
            assert torch.equal(m._int8[0], fresh[0]) and torch.equal(m._int8[1], fresh[1]), name
        with torch.no_grad():
            assert torch.equal(loaded(ids), want), attempt
        if attempt == "mapped":
            cached.unlink()  # a new file, as a replace would be: `loaded` still maps the old one
            cached.write_bytes(b"not a safetensors file")
    assert cached.stat().st_size > 1000 and cached.stat().st_mtime_ns != stamp  # rewritten, not trusted


def test_input_scales_lower_the_output_error(tiny):
    """The data-free column scales (importance.py) must not make a model worse than plain TurboQuant."""
    model = wren.load(tiny["gemma3"][2])
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids)
    errors = {}
    for scaled in (False, True):
        m = wren.load(tiny["gemma3"][2])
        recipe = folder.quantize_model(m, bits=3, group=0, embed_bits=8, input_scales=scaled)
        assert any(spec.get("input_scale") for spec in recipe["modules"].values()) == scaled
        with torch.no_grad():
            errors[scaled] = ((m(ids) - ref).norm() / ref.norm()).item()
    assert 0 < errors[True] < errors[False] * 1.1, errors


def test_output_folder_must_be_new(tiny, tmp_path):
    model = wren.load(tiny["gemma3"][2])
    folder.quantize_model(model, bits=4, group=32, embed_bits=None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(BadOptionError):
        folder.save(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_cli_quantize_then_perplexity(tiny, tmp_path):
    src = tiny["gemma3"][2]
    text = tmp_path / "text.txt"
    text.write_text("the sweet tea was hot and the wet net sat on the mat " * 40)
    run = lambda *a: subprocess.run([sys.executable, "-m", "wren", *a], capture_output=True, text=True, timeout=300)
    q = run("quantize", str(src), "--bits", "4", "--group-size", "32", "-o", str(tmp_path / "q4"), "--quiet")
    assert q.returncode == 0, q.stderr
    assert "bits/weight" in q.stdout
    # The default recipe gives v_proj two more bits; --uniform gives none; "+N" is relative to --bits.
    bits = lambda folder_path: {n: m["bits"] for n, m in wren.load(folder_path).quant_recipe["modules"].items()
                                if m["kind"] == "linear"}
    default = bits(tmp_path / "q4")
    assert {b for n, b in default.items() if n.endswith("v_proj")} == {6.0}
    assert {b for n, b in default.items() if not n.endswith("v_proj")} == {4.0}
    u = run("quantize", str(src), "--bits", "3", "--group-size", "32", "--uniform", "-o", str(tmp_path / "u3"),
            "--quiet")
    assert u.returncode == 0, u.stderr
    assert set(bits(tmp_path / "u3").values()) == {3.0}
    r = run("quantize", str(src), "--bits", "3", "--group-size", "32", "--module-bits", "*.o_proj=+1",
            "-o", str(tmp_path / "r3"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert {b for n, b in bits(tmp_path / "r3").items() if n.endswith("o_proj")} == {4.0}
    for model in (str(src), str(tmp_path / "q4")):
        p = run("perplexity", model, "--file", str(text), "--ctx", "64", "--json")
        assert p.returncode == 0, p.stderr
        result = json.loads(p.stdout)
        assert result["tokens"] > 0 and result["ctx"] == 64 and result["perplexity"] > 1
        assert result["file_bytes"] > 0 and result["bits_per_weight"] > 0
    human = run("perplexity", str(src), "--file", str(text), "--ctx", "64")
    assert human.stdout.startswith("Final estimate: PPL = ")
    bad = run("perplexity", str(src), "--file", str(tmp_path / "missing.txt"))
    assert bad.returncode == 1 and bad.stderr.startswith("Error: ")


@pytest.mark.slow
def test_quantized_default_model_stays_within_measured_error(tmp_path):
    """The real 270M at 4 bits (row-wise, 8-bit embedding) loads from its folder, generates, and its
    perplexity on real prose stays within the loss measured for it (x1.31 on Pride and Prejudice)."""
    from real_text import stdlib_prose
    from wren.perplexity import perplexity

    model = wren.load()
    ids = model.tokenizer.encode(stdlib_prose(20_000))
    ref = perplexity(model, ids, ctx=512, chunks=2).perplexity
    folder.quantize_model(model, bits=4, group=0, embed_bits=8)
    loaded = wren.load(folder.save(model, tmp_path / "tq4"))
    assert folder.linear_bits_per_weight(loaded) < 4.05
    ratio = perplexity(loaded, ids, ctx=512, chunks=2).perplexity / ref
    print(f"TQ4 row-wise perplexity ratio {ratio:.3f}")
    assert ratio < 1.5
    assert wren.generate(loaded, "The capital of France is", raw=True, temperature=0, num_predict=8).strip()
