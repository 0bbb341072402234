"""`wren bench` and the numbers behind it: bytes read per token, the bandwidth limit, clear errors."""

from __future__ import annotations

import json

import torch

import wren
from wren import cli
from wren.quant import folder
from wren.speed import bench, copy_bandwidth, weight_bytes_per_token


def test_weight_bytes_count_what_the_kernels_read(tiny):
    model = wren.load(tiny["gemma3"][1])
    linears = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.embed_tokens.weight.nbytes if model.lm_head is None else 0  # a tied head reads the table
    assert weight_bytes_per_token(model) == linears + head
    dense = weight_bytes_per_token(model)
    folder.quantize_model(model, bits=4, group=32, embed_bits=8)
    # the CPU fast path reads int8 levels: about a quarter of fp32, plus the row scales
    assert weight_bytes_per_token(model) < dense / 3.5


def test_moe_experts_count_only_the_top_k_share(tiny):
    model = wren.load(tiny["gemma4-26b"][1])
    cfg = model.config
    linears = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    experts = sum(p.nbytes for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter)
                  for p in m.parameters(recurse=False))
    head = model.embed_tokens.weight.nbytes if model.lm_head is None else 0
    expected = linears + head + experts * cfg.top_k_experts / cfg.num_experts
    assert abs(weight_bytes_per_token(model) - expected) <= 8


def test_bench_reports_speeds_and_a_limit_above_them(tiny):
    model = wren.load(tiny["gemma4-e2b"][1])  # PLE and KV-shared layers
    r = bench(model, prompt_tokens=24, gen_tokens=6, repeat=2, kv_cache="tq4")
    assert r["kv_cache"] == "tq4" and r["prompt_tokens"] == 24 and r["gen_tokens"] == 6
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "limit_tok_s", "bandwidth_bytes_s"):
        assert r[key] > 0, key
    assert r["peak_rss_bytes"] > 10 << 20
    assert copy_bandwidth(nbytes=8 << 20, repeat=2) > 1e8  # any machine copies faster than 100 MB/s


def test_cli_bench_json_and_errors(tiny, capsys):
    path = str(tiny["gemma3"][1])
    assert cli.main(["bench", path, "--prompt", "16", "--gen", "4", "--repeat", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_bytes", "limit_tok_s"} <= set(r)
    assert cli.main(["bench", path, "--prompt", "16", "--gen", "4", "--repeat", "1"]) == 0
    assert "decode" in capsys.readouterr().out
    assert cli.main(["bench", path, "--prompt", "100000"]) == 1
    assert "context" in capsys.readouterr().err
    assert cli.main(["bench", path, "--gen", "0"]) == 1
