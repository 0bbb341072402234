"""Gemma 4 E2B-shaped, TurboQuant 4-bit, on the CPU: what `wren bench` prints for a model no GGUF peer here
can load (no Gemma 4 file can be downloaded; the shape is what matters for speed).

    python bench/e2b_cpu.py                  # ~4 min to build (random weights, quantized layer by layer)
    python bench/e2b_cpu.py --prompt 512 --profile

The model: E2B's shape (35 layers, hidden 1536, 8 heads of 256 / 512, one KV head, the last 20 layers
sharing K/V with double-wide MLPs, per-layer embeddings of 256 in a host-side table), random weights,
quantized as `wren quantize --bits 4` would (groups of 128, v_proj at 6 bits, the tied embedding/LM head at
8; no input scales: random weights have no loud channels to find). Prints wren.speed.bench's JSON; with
--profile, the Python profile of ten decode steps by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wren import speed  # noqa: E402
from wren.config import Gemma4Config  # noqa: E402
from wren.kv import make_kv_cache  # noqa: E402
from wren.models.gemma4 import Gemma4  # noqa: E402
from wren.quant.linear import TQEmbedding, TQLinear  # noqa: E402
from wren.weights.tables import RowTable  # noqa: E402

SL, FU = "sliding_attention", "full_attention"


def e2b_config() -> Gemma4Config:
    n = 35
    return Gemma4Config(hidden_size=1536, intermediate_size=6144, num_hidden_layers=n, num_attention_heads=8,
                        num_key_value_heads=1, head_dim=256, global_head_dim=512, sliding_window=512,
                        num_kv_shared_layers=20, use_double_wide_mlp=True, hidden_size_per_layer_input=256,
                        layer_types=[FU if (i + 1) % 5 == 0 or i == n - 1 else SL for i in range(n)],
                        final_logit_softcapping=30.0, max_position_embeddings=4096)


def build(cfg: Gemma4Config, seed: int = 0) -> Gemma4:
    """The model on the meta device, then each linear layer drawn and quantized in turn (a dense fp32 copy
    of the whole model would not fit beside the rest in 24 GB)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Gemma4(cfg)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            w = torch.randn(mod.out_features, mod.in_features, generator=g) * mod.in_features ** -0.5
            bits = 6 if child == "v_proj" else 4
            setattr(model.get_submodule(parent_name), child, TQLinear.from_dense(w, bits, 128, seed=0))
    model.embed_tokens = TQEmbedding.from_dense(torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g), 8, 128,
                                                seed=0)
    for mod in model.modules():  # the norms and scalars left on the meta device: ones
        for name, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if p.is_meta:
                setattr(mod, name, type(p)(torch.ones(p.shape), requires_grad=False) if isinstance(p, nn.Parameter)
                        else torch.ones(p.shape))
    rows = torch.empty(cfg.vocab_size, cfg.num_hidden_layers * cfg.hidden_size_per_layer_input, dtype=torch.bfloat16)
    for start in range(0, rows.shape[0], 16384):  # drawn in slices: the fp32 draw of the whole table is 9 GB
        rows[start:start + 16384] = (torch.randn(min(16384, rows.shape[0] - start), rows.shape[1], generator=g)
                                     * 0.02).bfloat16()
    model.embed_tokens_per_layer = RowTable.from_tensor(rows)
    model.init_rope()
    return model.eval().requires_grad_(False)


def profile(model, prompt: int) -> None:
    cache = make_kv_cache(model, batch=1, max_len=prompt + 16)
    with torch.inference_mode():
        model(torch.randint(1000, model.config.vocab_size, (1, prompt)), cache, logits_to_keep=1)
        ids = torch.tensor([[5000]])
        for _ in range(3):
            model(ids, cache, logits_to_keep=1)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            model(ids, cache, logits_to_keep=1)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=speed.default_threads())
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build(e2b_config())
    print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    result = speed.bench(model, prompt_tokens=args.prompt, gen_tokens=args.gen, repeat=args.repeat)
    result.pop("peak_rss_bytes")  # the build's, not the run's
    print(json.dumps(result, indent=1))
    if args.profile:
        profile(model, args.prompt)


if __name__ == "__main__":
    main()
