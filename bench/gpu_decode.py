"""Decode speed on one GPU: wren's TurboQuant 4-bit weights against `transformers` bf16 eager, on Gemma 4
shapes with random weights, as a fraction of what the memory allows.

    python bench/gpu_decode.py                              # a CUDA machine: the E2B and 31B shapes
    python bench/gpu_decode.py --shapes e2b --batch 1       # one row
    python bench/gpu_decode.py --shapes tiny --device cpu   # the same code on a tiny shape (the tests run it)

Per shape: `transformers` builds the model (random bf16 weights, eager attention), prefills a random prompt
and decodes --tokens greedy tokens at each batch size. wren then builds the same model from those very
tensors (its logits are checked against transformers' before anything is timed), quantizes every linear
layer and the tied embedding/LM head to TurboQuant 4 bits in groups of 128 (`TQ4`: 4.125 bits a weight),
drops the transformers model, and decodes the same way: each step one replay of the CUDA graph that
graphs.StaticDecoder captures at the first step (the first step is not timed). The PLE table (E2B) stays
in host memory, its rows gathered there and copied over each step.

The limit: measured copy bandwidth (bytes read + written by a large device copy) / bytes a step must read.
`limit 4.25b` counts every weight a token touches at 4.25 bits (the issue's yardstick); `limit read` counts
the bytes wren's kernels read (codes and scales, plus the bf16 KV cache at the mean context). Timings are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wren.graphs import StaticDecoder  # noqa: E402
from wren.kv import kv_cache_bytes, make_kv_cache  # noqa: E402
from wren.quant import folder  # noqa: E402
from wren.speed import copy_bandwidth, weight_bytes_per_token  # noqa: E402

SL, FU = "sliding_attention", "full_attention"


def _pattern(n: int) -> list[str]:
    """Five sliding layers, then a full one, ending on a full one (Gemma 4's layout)."""
    return [FU if (i + 1) % 6 == 0 or i == n - 1 else SL for i in range(n)]


SHAPES = {
    # Gemma 4 31B: dense, K=V full layers with fewer (global) KV heads
    "31b": dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
                num_key_value_heads=16, head_dim=256, global_head_dim=512, num_global_key_value_heads=4,
                attention_k_eq_v=True, sliding_window=1024, hidden_size_per_layer_input=0),
    # Gemma 4 E2B: per-layer embeddings, the last 20 layers share K/V, double-wide MLPs there
    "e2b": dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256, global_head_dim=512, sliding_window=512,
                num_kv_shared_layers=20, use_double_wide_mlp=True, hidden_size_per_layer_input=256),
    # the code path of E2B at a size the CPU runs in seconds (the tests)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=16, vocab_size=512,
                 layer_types=[SL, SL, FU, SL, SL, SL, FU],
                 num_kv_shared_layers=3, use_double_wide_mlp=True, hidden_size_per_layer_input=16,
                 vocab_size_per_layer_input=512),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_model(shape: str, device: str):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    fields = dict(SHAPES[shape])
    fields.setdefault("vocab_size", 262_144)
    fields.setdefault("vocab_size_per_layer_input", fields["vocab_size"])
    fields.setdefault("layer_types", _pattern(fields["num_hidden_layers"]))
    cfg = Gemma4TextConfig(**fields, max_position_embeddings=8192,
                           final_logit_softcapping=30.0, attn_implementation="eager")
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 at once: a 31B model in fp32 would not fit
    try:
        with torch.device(device):
            model = Gemma4ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(saved)
    return model.eval().requires_grad_(False)


def wren_model(hf, device: str):
    """wren's Gemma 4 on the transformers model's own tensors (no copy), the PLE table in host memory."""
    from wren.config import config_from_dict
    from wren.weights.load import _build, _wren_name
    from wren.weights.tables import RowTable

    cfg = config_from_dict(hf.config.to_dict())
    tensors, table = {}, None
    for name, t in hf.state_dict().items():
        name = _wren_name(name)
        if name == "embed_tokens_per_layer.weight":
            table = RowTable.from_tensor(t.to("cpu"))
        else:
            tensors[name] = (t.shape, lambda t=t: t)
    return _build(cfg, tensors, torch.bfloat16, table).to(device)


def prompt(vocab: int, batch: int, n: int) -> torch.Tensor:
    return torch.randint(1000 if vocab > 2000 else 2, vocab, (batch, n), generator=torch.Generator().manual_seed(batch))


def hf_decode(model, ids: torch.Tensor, tokens: int) -> float:
    """transformers' own loop (its dynamic cache), greedy; tokens/s of one sequence."""
    device = model.device
    out = model(input_ids=ids.to(device), use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    out = model(input_ids=token, past_key_values=cache, use_cache=True)  # one untimed step
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return tokens / (time.perf_counter() - t0)


def wren_decode(model, ids: torch.Tensor, tokens: int, graph: bool | None) -> float:
    device = model.norm.weight.device
    cache = make_kv_cache(model, batch=ids.shape[0], max_len=ids.shape[1] + tokens + 2)
    logits = model(ids.to(device), cache, logits_to_keep=1)[:, -1]
    step = StaticDecoder(model, cache, graph=graph)
    token = step(logits.argmax(-1, keepdim=True)).argmax(-1, keepdim=True)  # captures the graph: not timed
    sync(device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        token = step(token).argmax(-1, keepdim=True)
    sync(device)
    return tokens / (time.perf_counter() - t0)


def profile_step(model, ids: torch.Tensor, path: Path) -> None:
    """The kernels of a few eager decode steps, by total device time: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    device = model.norm.weight.device
    cache = make_kv_cache(model, batch=ids.shape[0], max_len=ids.shape[1] + 8)
    logits = model(ids.to(device), cache, logits_to_keep=1)[:, -1]
    step = StaticDecoder(model, cache, graph=False)
    token = step(logits.argmax(-1, keepdim=True)).argmax(-1, keepdim=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            token = step(token).argmax(-1, keepdim=True)
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40))


def check_logits(hf, model, vocab: int, device: str) -> float:
    """Relative L2 distance of wren's logits (before quantizing) from transformers' on one prompt."""
    ids = prompt(vocab, 1, 16).to(device)
    ref = hf(input_ids=ids).logits.float()
    got = model(ids).float()
    return ((got - ref).norm() / ref.norm()).item()


def touched_params(model) -> int:
    """Weights one decode step reads: every linear layer and the (tied) LM head; PLE rows left out."""
    from torch import nn

    from wren.quant.linear import TQLinear

    n = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, (nn.Linear, TQLinear)))
    return n + (model.config.vocab_size * model.config.hidden_size if model.lm_head is None else 0)


def run_shape(shape: str, args, bandwidth: float) -> list[dict]:
    device = args.device
    log(f"{shape}: building the transformers model (random bf16 weights)")
    hf = hf_model(shape, device)
    vocab = hf.config.vocab_size
    rows = []
    with torch.inference_mode():
        hf_rates = {}
        for b in args.batch:
            hf_rates[b] = statistics.median(hf_decode(hf, prompt(vocab, b, args.prompt), args.tokens)
                                            for _ in range(args.repeat))
            log(f"{shape}: transformers bf16 batch {b}: {hf_rates[b]:.1f} tok/s")
        model = wren_model(hf, device)
        distance = check_logits(hf, model, vocab, device)
        log(f"{shape}: wren bf16 logits vs transformers: relative distance {distance:.2e}")
        if distance > 0.1:  # bf16 rounding is ~1e-2; a misread tensor (or another transformers) ~1
            log(f"{shape}: WARNING: wren's logits are {distance:.3f} away from transformers': read the row with care")
        del hf
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        log(f"{shape}: quantizing to TQ4 (group 128, embedding/LM head too)")
        t0 = time.perf_counter()
        folder.quantize_model(model, bits=4, group=128, embed_bits=4, module_bits={})
        log(f"{shape}: quantized in {time.perf_counter() - t0:.0f} s")
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        params = touched_params(model)
        read = weight_bytes_per_token(model)
        for b in args.batch:
            kv = kv_cache_bytes(model, None, b, args.prompt + args.tokens // 2)
            graph = None if device == "cuda" else False
            rate = statistics.median(wren_decode(model, prompt(vocab, b, args.prompt), args.tokens, graph)
                                     for _ in range(args.repeat))
            eager = wren_decode(model, prompt(vocab, b, args.prompt), max(4, args.tokens // 8), False)
            limit_425 = bandwidth / (params * 4.25 / 8)
            limit_read = bandwidth / (read + kv)
            rows.append({"shape": shape, "batch": b, "wren_tok_s": rate, "wren_eager_tok_s": eager,
                         "transformers_tok_s": hf_rates[b], "limit_425_tok_s": limit_425,
                         "limit_read_tok_s": limit_read, "of_limit_425": rate / limit_425,
                         "vs_transformers": rate / hf_rates[b], "params_touched": params,
                         "weight_bytes_read": read, "kv_bytes_read": kv, "logit_distance_bf16": distance})
            log(f"{shape}: wren TQ4 batch {b}: {rate:.1f} tok/s ({rate / limit_425:.0%} of the 4.25-bit limit), "
                f"without the graph {eager:.1f}")
            if args.profile and b == args.batch[0]:  # one profile a shape (the device tool returns 8 files)
                profile_step(model, prompt(vocab, b, args.prompt), Path(args.profile) / f"profile-{shape}-b{b}.txt")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], bandwidth: float) -> str:
    lines = [f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; tokens/s of one sequence (a batch of 8 makes 8x as many)",
             "",
             "| shape | batch | wren TQ4 | graph off | transformers bf16 | wren / transformers | limit 4.25b "
             "| of limit | limit read |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['wren_tok_s']:.1f} | {r['wren_eager_tok_s']:.1f} "
                     f"| {r['transformers_tok_s']:.1f} | {r['vs_transformers']:.1f}x | {r['limit_425_tok_s']:.0f} "
                     f"| {r['of_limit_425']:.0%} | {r['limit_read_tok_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["e2b", "31b"], choices=sorted(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens timed per run")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--profile", help="write each shape's kernel profile (3 eager steps at the first batch size) "
                                      "into this folder")
    args = ap.parse_args(argv)
    bandwidth = copy_bandwidth(args.device, nbytes=(1 << 30) if args.device == "cuda" else (64 << 20))
    rows = []
    for shape in args.shapes:
        rows += run_shape(shape, args, bandwidth)
        if args.json:  # after each shape: a run cut short by a time limit keeps what it measured
            Path(args.json).write_text(json.dumps({"bandwidth_bytes_s": bandwidth, "rows": rows}, indent=1))
    print(table(rows, bandwidth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
