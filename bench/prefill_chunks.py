"""One chunk of a prompt, n tokens, through the compiled layers (decode_plan.ChunkPlan) and through the modules,
side by side in one run: where the one stops beating the other is decode_plan.CHUNK_PLAN_MAX.

    python bench/prefill_chunks.py                                  # the default model (int8 levels), its cache
    python bench/prefill_chunks.py --model DIR --kv tq3.5 --sizes 8,64,128,256

Each time is the best of --repeat prefills of n random tokens into a fresh cache (after its first token, so
both paths find the plan built), logits of the last position only, as a server or `wren run` prefills.
Times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wren  # noqa: E402
from wren import decode_plan  # noqa: E402
from wren.kv import make_kv_cache  # noqa: E402
from wren.weights.load import default_model_path  # noqa: E402


def best_prefill(model, n: int, planned: bool, kv: str | None, repeat: int) -> float:
    decode_plan.ENABLED = planned
    best = float("inf")
    for _ in range(repeat):
        ids = torch.randint(0, model.config.vocab_size, (1, n + 1))
        cache = make_kv_cache(model, batch=1, max_len=n + 1, spec=kv)
        with torch.inference_mode():
            model(ids[:, :1], cache)
            start = time.perf_counter()
            model(ids[:, 1:], cache, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf file or a model folder (default: the embedded Gemma 3 270M)")
    ap.add_argument("--kv", help="the KV cache type (default: the model's)")
    ap.add_argument("--sizes", default="2,8,32,64,128,192,256,512")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    path = args.model or str(default_model_path())
    model = wren.load(path, int8=path.endswith(".gguf"))
    print(f"model {Path(path).name}, kv {args.kv or 'default'}, {torch.get_num_threads()} threads, "
          f"best of {args.repeat}; decode_plan.CHUNK_PLAN_MAX is {decode_plan.CHUNK_PLAN_MAX}")
    decode_plan.CHUNK_PLAN_MAX = 1 << 30  # here every size through the plan when it is on
    print(f"{'tokens':>6} {'modules ms':>10} {'plan ms':>8} {'plan tok/s':>10} {'speedup':>8}")
    for n in [int(s) for s in args.sizes.split(",")]:
        modules = best_prefill(model, n, False, args.kv, args.repeat)
        planned = best_prefill(model, n, True, args.kv, args.repeat)
        print(f"{n:6d} {modules * 1e3:10.1f} {planned * 1e3:8.1f} {n / planned:10.0f} {modules / planned:7.2f}x")


if __name__ == "__main__":
    main()
