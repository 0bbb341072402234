"""A GGUF's quantized weights as int8 levels (wren/quant/levels.py, wren/weights/gguf_levels.py): which modules
become levels, how far their logits are from the exact weights, and the level cache (written once, mapped
after, written again when corrupt or when the GGUF changes, skipped when it cannot be written)."""

from __future__ import annotations

import math
import os

import gguf
import pytest
import torch
from torch import nn

import wren
from gguf_writer import write_gguf
from real_text import stdlib_prose
from test_native import assert_same_steps
from tiny_models import gemma3_hf, gemma4_hf
from wren import decode_plan, native
from wren.quant import level_cache
from wren.quant.levels import LevelsEmbedding, LevelsLinear
from wren.quant.linear import reference_path
from wren.weights import gguf_levels
from wren.weights.gguf import GGUFFile
from wren.weights.gguf_quants import dequantize

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def hf():
    return gemma3_hf(hidden=128, head_dim=32, intermediate=256)  # widths of 128 and 256: every layer converts


@pytest.fixture(scope="module")
def tiny_q8(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("levels") / "tiny-q8_0.gguf"
    write_gguf(hf, path, "gemma3", tensor_type=Q.Q8_0)
    return path


def _ids(n=40, seed=0):
    return torch.randint(8, 384, (1, n), generator=torch.Generator().manual_seed(seed))


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0])
def test_quantized_weights_become_levels_close_to_the_exact_ones(hf, tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, path, "gemma3", tensor_type=qtype)
    exact, fast = wren.load(path), wren.load(path, int8=True)
    linears = [n for n, m in exact.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * 7 + 1  # and the writer's untied head (the real model's tied one: the last test)
    assert all(isinstance(fast.get_submodule(n), LevelsLinear) for n in linears)
    assert fast.notes and "int8 levels" in fast.notes[-1]
    ids = _ids()
    with torch.no_grad():
        want = exact(ids)
        got = fast(ids)
        with reference_path():  # the levels in float32, no int8 input: the levels' own error
            got_reference = fast(ids)
        # the embedding reads the GGUF's own rows: exact
        assert torch.equal(fast.embed_tokens(ids), exact.embed_tokens(ids))
    assert _relative(got_reference, want) < 0.015  # measured 0.8% (Q8_0, Q4_0, Q5_0)
    assert _relative(got, want) < 0.025  # measured 1.1%
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_gemma4_with_per_layer_embeddings(tmp_path):
    """Gemma 4 (E2B's shape: PLE, KV sharing, double-wide MLPs): the linear layers 128 wide or wider become
    levels, the narrow per-layer projection stays exact, and so do the PLE table's lookups."""
    hf = gemma4_hf("e2b", head_dim=32, hidden_size=128, intermediate_size=256, hidden_size_per_layer_input=32)
    path = tmp_path / "e2b.gguf"
    write_gguf(hf, path, "gemma4", tensor_type=Q.Q8_0)
    exact, fast = wren.load(path), wren.load(path, int8=True)
    kinds = {n: type(m) for n, m in fast.named_modules() if isinstance(m, (nn.Linear, LevelsLinear))}
    assert kinds["layers.0.per_layer_projection"] is nn.Linear  # 32 wide: no group of 128
    assert kinds["layers.0.per_layer_input_gate"] is LevelsLinear
    assert sum(k is LevelsLinear for k in kinds.values()) >= 7 * 7
    ids = _ids()
    with torch.no_grad():
        want, got = exact(ids), fast(ids)
    assert _relative(got, want) < 0.025
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_converted_rows_are_within_two_percent_of_the_dequantized_weight(tiny_q8):
    gf = GGUFFile(tiny_q8)
    info = gf.tensors["blk.0.ffn_down.weight"]
    levels, scales = gguf_levels.convert(gf, info)
    exact = dequantize(gf.raw(info.name), info.ggml_type, info.shape)
    fast = LevelsLinear(*info.shape)
    fast.levels, fast.row_scales = levels, scales
    error = (fast.dense() - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(error.max()) < 0.02
    assert float(error.mean()) < 0.012


@pytest.mark.skipif(not native.blocks_readable(),
                    reason="the compiled conversion needs AVX-512 VNNI, VL and F16C, or AVX2")
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0])
def test_compiled_conversion_is_bit_for_bit_pytorchs(hf, tmp_path, monkeypatch, qtype):
    """Where the block kernels run, a load converts each tensor in one compiled pass: the same levels and
    scales as dequantizing and rotating in PyTorch (every block type: test_gguf_blocks.py)."""
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, path, "gemma3", tensor_type=qtype)
    gf = GGUFFile(path)
    infos = [gf.tensors[name] for name in ("blk.0.ffn_down.weight", "blk.1.attn_q.weight")]
    compiled = [gguf_levels.convert(gf, info) for info in infos]
    monkeypatch.setattr(native, "blocks_readable", lambda: False)
    for info, (levels, scales) in zip(infos, compiled):
        want_levels, want_scales = gguf_levels.convert(gf, info)
        assert torch.equal(levels, want_levels) and torch.equal(scales, want_scales)


def test_decode_plan_runs_the_levels_as_the_modules_do(tiny_q8):
    fast = wren.load(tiny_q8, int8=True)
    ids = _ids(12)
    outs = []
    for enabled in (True, False):
        decode_plan.ENABLED = enabled
        try:
            cache = fast.make_cache(1, 32)
            with torch.no_grad():
                prompt = fast(ids, cache)
                outs.append(torch.cat([prompt] + [fast(torch.tensor([[t]]), cache) for t in (17, 40, 99)], 1))
        finally:
            decode_plan.ENABLED = True
    # the plan's norms and attention round as the modules' do to ~1e-7, so now and then an int8 input of a later
    # matmul flips (one token's, and those attending to it, move by ~0.1%): the prompt's 12 positions and 3 steps
    assert_same_steps(outs[0], outs[1])


def test_dense_typed_weights_stay_exact(tiny):
    _, _, path = tiny["gemma3"]  # an F32 GGUF
    fast = wren.load(path, int8=True)
    assert not any(isinstance(m, LevelsLinear) for m in fast.modules())
    assert not fast.notes


def test_level_cache_is_written_once_then_mapped(tiny_q8, monkeypatch, tmp_path):
    monkeypatch.setenv("WREN_LEVEL_CACHE", str(tmp_path / "levels"))
    first = wren.load(tiny_q8, int8=True)
    files = list((tmp_path / "levels").glob("gguf-*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(gguf_levels, "convert", _fail)  # a later load converts nothing
    second = wren.load(tiny_q8, int8=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))
    assert torch.equal(second.layers[0].mlp.down_proj.levels, first.layers[0].mlp.down_proj.levels)


def test_hard_links_share_one_cache(tiny_q8, monkeypatch, tmp_path):
    """A GGUF pulled into the model store is a hard link of the user's file: loading either one must not
    write a second copy of its levels or its tokenizer's arrays."""
    monkeypatch.setenv("WREN_LEVEL_CACHE", str(tmp_path / "levels"))
    monkeypatch.setenv("WREN_TOKENIZER_CACHE", str(tmp_path / "tokenizers"))
    link = tmp_path / "store" / "blob"
    link.parent.mkdir()
    os.link(tiny_q8, link)
    wren.load(tiny_q8, int8=True)
    monkeypatch.setattr(gguf_levels, "convert", _fail)  # the link's load converts nothing
    wren.load(link, int8=True)
    assert len(list((tmp_path / "levels").glob("gguf-*.safetensors"))) == 1
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1


def _fail(*args):
    raise AssertionError("converted again")


def test_corrupt_cache_is_written_again(tiny_q8, monkeypatch, tmp_path):
    monkeypatch.setenv("WREN_LEVEL_CACHE", str(tmp_path / "levels"))
    ids = _ids()
    with torch.no_grad():
        want = wren.load(tiny_q8, int8=True)(ids)  # (the model is dropped: it maps the file cut below)
    (cached,) = (tmp_path / "levels").glob("gguf-*.safetensors")
    size = cached.stat().st_size
    with open(cached, "r+b") as f:
        f.truncate(size // 2)
    again = wren.load(tiny_q8, int8=True)
    assert cached.stat().st_size == size
    with torch.no_grad():
        assert torch.equal(again(ids), want)


def test_changed_gguf_gets_new_levels(hf, monkeypatch, tmp_path):
    monkeypatch.setenv("WREN_LEVEL_CACHE", str(tmp_path / "levels"))
    path = tmp_path / "m.gguf"
    write_gguf(hf, path, "gemma3", tensor_type=Q.Q8_0)
    ids = _ids()
    with torch.no_grad():
        before = wren.load(path, int8=True)(ids)  # (the model is dropped: it maps the file rewritten below)
    write_gguf(gemma3_hf(seed=1, hidden=128, head_dim=32, intermediate=256), path, "gemma3", tensor_type=Q.Q8_0)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    after, exact = wren.load(path, int8=True), wren.load(path)
    assert len(list((tmp_path / "levels").glob("gguf-*.safetensors"))) == 2
    with torch.no_grad():
        assert not torch.equal(after(ids), before)
        assert _relative(after(ids), exact(ids)) < 0.05


def test_unwritable_cache_converts_in_memory(tiny_q8, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(level_cache, "cache_root", lambda: blocker / "levels")
    fast = wren.load(tiny_q8, int8=True)
    monkeypatch.undo()
    monkeypatch.setenv("WREN_LEVEL_CACHE", str(tmp_path / "levels"))
    cached = wren.load(tiny_q8, int8=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fast(ids), cached(ids))


def test_exact_weights_flag_reaches_the_loader():
    from wren.cli import build_parser
    from wren.server.app import settings_from_args

    parser = build_parser()
    assert parser.parse_args(["run", "hi", "--exact-weights"]).exact_weights
    assert not parser.parse_args(["bench"]).exact_weights
    assert settings_from_args(parser.parse_args(["serve", "--exact-weights"])).exact_weights
    assert not settings_from_args(parser.parse_args(["serve"])).exact_weights


@pytest.mark.slow
def test_default_model_levels_keep_its_perplexity(default_model, default_model_int8):
    """Two windows of 512 tokens of real prose: the levels (and the int8 input of the compiled kernels) move
    perplexity by well under 1% (measured on 8 windows: +0.12%; llama.cpp's kernels +0.97%)."""
    fast = default_model_int8
    assert isinstance(fast.embed_tokens, LevelsEmbedding)  # the tied head reads levels, the lookups the GGUF
    ids = default_model.tokenizer.encode(stdlib_prose())
    nll = {"exact": [], "int8": []}
    agree = total = 0
    for w in range(2):
        tokens = torch.tensor([[default_model.tokenizer.bos_id] + ids[w * 511:(w + 1) * 511]])
        with torch.no_grad():
            outs = {"exact": default_model(tokens)[0, :-1], "int8": fast(tokens)[0, :-1]}
        for name, logits in outs.items():
            logp = torch.log_softmax(logits[256:], -1)
            nll[name] += (-logp[torch.arange(logp.shape[0]), tokens[0, 257:]]).tolist()
        agree += int((outs["exact"].argmax(-1) == outs["int8"].argmax(-1)).sum())
        total += outs["exact"].shape[0]
    ppl = {k: math.exp(sum(v) / len(v)) for k, v in nll.items()}
    print(f"perplexity exact {ppl['exact']:.4f} int8 {ppl['int8']:.4f}; argmax agreement {agree / total:.4f}")
    assert abs(ppl["int8"] / ppl["exact"] - 1) < 0.01
    assert agree / total >= 0.93
