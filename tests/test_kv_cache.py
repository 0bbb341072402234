"""Compressed KV caches (wren.kv): type specs, byte formulas, every type through prefill, decode, sliding
windows, KV sharing and batches on the tiny models, and attention from codes against the dense reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

import wren
from slot_driver import drive, random_sequences
from conftest import TINY
from wren.errors import BadOptionError
from wren.kv import (TYPES, CompressedKVCache, codec_for, kv_bytes_per_token, kv_cache_bytes, kv_cache_types,
                     make_kv_cache)

QUANTIZED = ["q8", "tq4", "tq3.5", "tq3", "tq2.5", "tq2"]
ALL = [*TYPES, "tq4/tq3", "q8/tq2.5"]


def ids_for(seed: int, batch: int = 2, length: int = 20, vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tiny):
    return {name: wren.load(tiny[name][1]) for name in TINY}


def test_parse_types(monkeypatch):
    monkeypatch.delenv("WREN_KV_CACHE", raising=False)
    assert kv_cache_types("tq4") == ("tq4", "tq4")
    assert kv_cache_types("TQ4/q8") == ("tq4", "q8")
    assert kv_cache_types("tq3.5/tq2.5") == ("tq3.5", "tq2.5")
    assert kv_cache_types(None) == ("auto", "auto")
    monkeypatch.setenv("WREN_KV_CACHE", "q8/tq3")
    assert kv_cache_types(None) == ("q8", "tq3")
    assert kv_cache_types("f16") == ("f16", "f16")  # an explicit type beats the environment
    for bad in ["", "q4", "tq5", "tq4/", "tq4/tq3/q8", "fp8", "tq2.25", 4]:
        with pytest.raises(BadOptionError):
            kv_cache_types(bad)


def test_codec_distortion_matches_turboquant():
    """Relative MSE per head vector: q8 near lossless, tqB at (or under: the least-squares scale) the paper's
    Lloyd–Max distortion."""
    x = torch.randn(2000, 256, generator=torch.Generator().manual_seed(0))
    expected = {"tq4": 0.0095, "tq3": 0.0345, "tq2": 0.117}
    for name in QUANTIZED:
        c = codec_for(name, 256)
        y = c.decode(c.encode(x), torch.float32)
        mse = ((y - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item()
        assert mse <= expected.get(name, 0.12) * 1.05, (name, mse)
        assert mse <= (1e-4 if name == "q8" else 1.0)


@pytest.mark.parametrize("name", TINY)
def test_measured_bytes_match_the_formula(models, name):
    model = models[name]
    for spec in ["auto", *ALL]:
        cache = make_kv_cache(model, batch=2, max_len=40, spec=spec)
        assert cache.nbytes() == kv_cache_bytes(model, spec, batch=2, max_len=40), spec
        with torch.inference_mode():
            model(ids_for(0), cache)  # allocated up front: writing changes nothing
        assert cache.nbytes() == kv_cache_bytes(model, spec, batch=2, max_len=40), spec
        short = make_kv_cache(model, batch=3, max_len=model.config.sliding_window, spec=spec)  # no ring
        assert short.nbytes() == 3 * model.config.sliding_window * kv_bytes_per_token(model, spec), spec
    dense = kv_bytes_per_token(model, "f32")
    assert kv_bytes_per_token(model, "f16") * 2 == dense
    assert kv_bytes_per_token(model, "tq4") < kv_bytes_per_token(model, "q8") < dense / 3
    assert kv_bytes_per_token(model, "tq2") < kv_bytes_per_token(model, "tq2.5") < kv_bytes_per_token(model, "tq3")
    assert isinstance(make_kv_cache(model, 1, 16, "q8"), CompressedKVCache)
    assert not isinstance(make_kv_cache(model, 1, 16, "f32"), CompressedKVCache)  # the model's own dtype


# relative L2 error of the logits against the dense cache (tiny random models amplify errors)
REL_TOL = {"f16": 0.01, "bf16": 0.03, "f32": 1e-6, "q8": 0.03, "tq4": 0.15, "tq4/tq3": 0.2}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("spec", ALL)
def test_every_type_prefill_decode_window_batch(models, name, spec):
    """A 20-token batch of 2 (the window is 6) in one prefill, and again as a prefill chunk plus single-token
    decode steps: close to the dense cache, and chunking does not change what the cache holds."""
    model = models[name]
    ids = ids_for(3)
    with torch.inference_mode():
        ref = model(ids, model.make_cache(batch=2, max_len=24))
        out = model(ids, make_kv_cache(model, 2, 24, spec))
        cache = make_kv_cache(model, 2, 24, spec)
        steps = [model(ids[:, :9], cache)] + [model(ids[:, j:j + 1], cache) for j in range(9, 20)]
    steps = torch.cat(steps, 1)
    assert torch.isfinite(out).all() and torch.isfinite(steps).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= REL_TOL.get(spec, 0.5), rel
    # Same codes either way; a rounding flip on a code boundary may move a logit a little.
    assert ((steps - out).norm() / out.norm()).item() <= 5e-4


@pytest.mark.parametrize("name", ["gemma3", "gemma4-e2b"])
@pytest.mark.parametrize("spec", ["q8", "tq4", "tq2"])
def test_greedy_generation_batch_with_padding(models, name, spec):
    from wren.generation import Generation
    from wren.sampling import Options

    model = models[name]
    prompts = [[2, *range(40, 52)], [2, 50, 51, 52]]  # longer than the window, left-padded
    opts = Options(temperature=0, repeat_penalty=1.0, num_predict=10)
    rows = [[], []]
    for step in Generation(model, prompts, opts, stop_ids=set(), kv_cache=spec):
        for row, token in enumerate(step):
            rows[row].append(token)
    assert all(len(r) == 10 and all(isinstance(t, int) for t in r) for r in rows)
    if spec == "q8":  # near lossless: the same greedy tokens as the dense cache
        dense = [t for (t,) in Generation(model, prompts[:1], opts, stop_ids=set())]
        assert rows[0][:4] == dense[:4]
    with pytest.raises(BadOptionError):
        Generation(model, prompts, opts, stop_ids=set(), kv_cache="q5")


def test_model_parameter_and_environment_choose_the_cache(models, monkeypatch):
    from wren.generation import Generation
    from wren.sampling import Options

    model = models["gemma3"]
    opts = Options(temperature=0, num_predict=2)
    monkeypatch.setenv("WREN_KV_CACHE", "tq3")
    assert Generation(model, [[2, 3]], opts, set()).kv_types == ("tq3", "tq3")
    monkeypatch.setattr(model, "kv_cache", "q8/tq4", raising=False)
    assert Generation(model, [[2, 3]], opts, set()).kv_types == ("q8", "tq4")
    assert Generation(model, [[2, 3]], opts, set(), kv_cache="f16").kv_types == ("f16", "f16")


@pytest.mark.parametrize("types", [("tq4", "tq4"), ("tq3.5", "tq2.5"), ("tq2", "tq3")])
@pytest.mark.parametrize("scaled", [False, True])
def test_rotated_attention_equals_dense_reference_on_the_same_codes(types, scaled):
    from wren.models.layers import InFrame, attend, attention_mask

    g = torch.Generator().manual_seed(1)
    b, h, hkv, t, s, d = 2, 8, 2, 3, 40, 128
    kc, vc = codec_for(types[0], d), codec_for(types[1], d)
    key_scale = (torch.rand(d, generator=g) * 4 + 0.25) if scaled else None
    k = torch.randn(b, hkv, s, d, generator=g)
    K, V = kc.encode(k * key_scale if scaled else k), vc.encode(torch.randn(b, hkv, s, d, generator=g))
    q = torch.randn(b, h, t, d, generator=g)
    pos = torch.arange(s - t, s).expand(b, t)
    mask = attention_mask(pos, torch.arange(s).expand(b, -1), 16)
    keys = kc.decode(K, torch.float32) / (key_scale if scaled else 1.0)
    ref = attend(q, keys, vc.decode(V, torch.float32), mask, d ** -0.5, 50.0)
    keys_in_frame, values_in_frame = kc.read(K, torch.float32, key_scale), vc.read(V, torch.float32)
    assert isinstance(keys_in_frame, InFrame) and isinstance(values_in_frame, InFrame)
    out = attend(q, keys_in_frame, values_in_frame, mask, d ** -0.5, 50.0)
    assert (out - ref).abs().max().item() <= 1e-4


def test_key_scales_put_the_error_where_queries_do_not_look():
    """Gains like Gemma's q_norm/k_norm (a few loud key channels the query ignores, dead channels): the
    scaled cache's score error is several times smaller than the plain cache's at the same bytes."""
    from wren.kv.scales import key_scale
    from wren.models.layers import RMSNorm

    g = torch.Generator().manual_seed(3)
    d, n = 256, 512
    q_norm, k_norm = RMSNorm(d, 1e-6, offset=1.0), RMSNorm(d, 1e-6, offset=1.0)
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(d, generator=g) * 2 - 1)
        k_norm.weight.copy_(torch.rand(d, generator=g) * 2 - 1)
        k_norm.weight[:8] = 20.0   # loud key channels...
        q_norm.weight[:8] = -0.95  # ...that the query barely reads
        k_norm.weight[100:104] = -1.0  # dead key channels (gain 0)
    gq = (q_norm.weight.detach() + 1).abs()
    gk = (k_norm.weight.detach() + 1).abs()
    s = key_scale(q_norm, k_norm)
    assert s.shape == (d,) and torch.isfinite(s).all() and s.min() >= 1 / 32 and s.max() <= 32
    q = torch.randn(n, d, generator=g) * gq
    k = torch.randn(n, d, generator=g) * gk
    codec = codec_for("tq3", d)
    plain = codec.decode(codec.encode(k), torch.float32)
    scaled = codec.decode(codec.encode(k * s), torch.float32) / s
    err_plain = ((q * (plain - k)).sum(-1)).pow(2).mean()
    err_scaled = ((q * (scaled - k)).sum(-1)).pow(2).mean()
    assert err_scaled < err_plain / 3


def test_perplexity_json_reports_the_cache(tiny, tmp_path, capsys):
    from wren import cli

    text = tmp_path / "text.txt"
    text.write_text("the sweet tea was hot and the wet net sat on the mat " * 20)
    results = {}
    for spec in ["f32", "q8", "tq2"]:
        assert cli.main(["perplexity", str(tiny["gemma3"][2]), "--file", str(text), "--ctx", "32",
                         "--chunks", "2", "--kv-cache", spec, "--json"]) == 0
        results[spec] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert results[spec]["kv_cache"] == spec and math.isfinite(results[spec]["perplexity"])
    assert results["tq2"]["kv_bytes_per_token"] < results["q8"]["kv_bytes_per_token"] \
        < results["f32"]["kv_bytes_per_token"]
    log_ppl = {k: math.log(r["perplexity"]) for k, r in results.items()}  # a random model: huge perplexity
    assert abs(log_ppl["q8"] - log_ppl["f32"]) <= 1e-3 * log_ppl["f32"]
    assert cli.main(["perplexity", str(tiny["gemma3"][2]), "--file", str(text), "--kv-cache", "q7"]) == 1


@pytest.mark.parametrize("name,types", [("gemma3", ("tq4", "tq3")), ("gemma4-e2b", ("q8", "tq3.5")),
                                        ("gemma4-26b", ("tq2.5", "f16"))])
def test_compressed_slot_cache_rows_equal_each_sequence_alone(tiny, name, types):
    """The server's compressed cache: rows prefilled separately, decoded together at different lengths past
    the sliding window, a row truncated and reused; every logit equals that sequence alone through the
    single-sequence compressed cache (to float rounding of batched matmuls: logits reach ~20), and the
    bytes match the formula."""
    from wren.kv import CompressedSlotCache, kv_cache_bytes, make_slot_cache

    model = wren.load(tiny[name][1])
    seqs = random_sequences(5)
    with torch.no_grad():
        alone = {r: model(torch.tensor([s]), make_kv_cache(model, 1, 40, spec=types))[0] for r, s in seqs.items()}
        cache = make_slot_cache(model, 4, 40, types)
        assert isinstance(cache, CompressedSlotCache)
        assert cache.nbytes() == kv_cache_bytes(model, types, batch=4, max_len=40)
        out, again = drive(model, cache, seqs)
        # 1e-3: a key on a code boundary may land on the other side after a 1e-7 difference upstream (the
        # batched matmuls), moving a logit a little, as test_every_type_prefill_decode_window_batch allows
        for r in seqs:
            assert (out[r] - alone[r]).abs().max() < 1e-3
        assert (again - alone[3][29]).abs().max() < 1e-3


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("coded", [False, True])
def test_prefill_attention_skips_the_slots_no_query_of_a_block_sees(window, coded):
    """300 queries attend 128 at a time; each block is cut to the slots its queries see (causal, windowed):
    the same output as attending over every slot with the mask."""
    from wren.models.layers import attend, attention_mask, cached_attention

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 300, 64, generator=g)
    k, v = torch.randn(1, 2, 300, 64, generator=g), torch.randn(1, 2, 300, 64, generator=g)
    if coded:  # keys and values in a TurboQuant frame, as the compressed cache's prefill reads them
        codec = codec_for("tq4", 64)
        k, v = codec.read(codec.encode(k), torch.float32), codec.read(codec.encode(v), torch.float32)
    pos = torch.arange(300)[None]
    got = cached_attention(q, (k, v, torch.arange(300), None), pos, window, 0.125)
    expected = attend(q, k, v, attention_mask(pos, pos, window), 0.125)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
