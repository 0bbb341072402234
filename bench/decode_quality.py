"""Does the fast CPU path decode what the exact reference decodes? Teacher-forced decoding of real text, one
forward a token (the path a chat takes), through each of wren's CPU paths on the same TurboQuant model:

    python bench/decode_quality.py                      # 2000 tokens of the book, TQ4 weights, f16 cache
    python bench/decode_quality.py --tokens 600 --kv f32

Paths: `plan` (the compiled kernels, one call a layer: wren/decode_plan.py), `modules` (the same kernels one
op at a time), `pytorch` (WREN_NATIVE=0: PyTorch's int8 kernel on bf16 inputs), `reference` (the exact
float32 reference path, quant.linear.reference_path). Each path runs in its own process. Shown: perplexity,
and how often the top-1 token equals the reference's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT.parent / "shared" / "data" / "prideprejudice.txt"
PATHS = ("plan", "modules", "pytorch", "reference")


def child(path: str, model_path: str, ids: list[int], kv: str, threads: int) -> dict:
    import contextlib

    import torch

    import wren
    from wren import decode_plan
    from wren.kv import make_kv_cache
    from wren.quant.linear import reference_path

    torch.set_num_threads(threads)
    decode_plan.ENABLED = path == "plan"
    model = wren.load(model_path)
    nll, tops = 0.0, []
    with torch.inference_mode(), (reference_path() if path == "reference" else contextlib.nullcontext()):
        cache = make_kv_cache(model, batch=1, max_len=len(ids) + 1, spec=kv)
        t0 = time.perf_counter()
        for i in range(len(ids) - 1):
            logits = model(torch.tensor([[ids[i]]]), cache, logits_to_keep=1)[0, -1].float()
            nll -= torch.log_softmax(logits, -1)[ids[i + 1]].item()
            tops.append(int(logits.argmax()))
        seconds = time.perf_counter() - t0
    return {"ppl": math.exp(nll / (len(ids) - 1)), "tops": tops, "tok_s": (len(ids) - 1) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a TurboQuant folder (default: bench/decode.py's cached TQ4 of the default model)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--start-char", type=int, default=20000, help="where in the book the text starts")
    ap.add_argument("--kv", default="f16")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, model_path, kv = json.loads(args.child)
        ids = json.loads(sys.stdin.read())
        print(json.dumps(child(path, model_path, ids, kv, args.threads)))
        return

    import wren
    from wren.weights.load import DEFAULT_MODEL, resolve

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode import wren_weights  # bench/decode.py's TQ4 of the default model, quantized once and cached

    model_path = args.model or str(wren_weights(resolve(DEFAULT_MODEL), "tq4"))
    tokenizer = wren.load(model_path).tokenizer
    ids = tokenizer.encode(BOOK.read_text()[args.start_char:args.start_char + 20 * args.tokens])[:args.tokens]
    results = {}
    for path in args.paths.split(","):
        env = {**os.environ, **({"WREN_NATIVE": "0"} if path == "pytorch" else {})}
        run = subprocess.run([sys.executable, __file__, "--child", json.dumps([path, model_path, args.kv]),
                              "--threads", str(args.threads)], input=json.dumps(ids), capture_output=True,
                             text=True, env=env, cwd=Path(__file__).parent)
        if run.returncode:
            sys.exit(f"{path}: {run.stderr[-2000:]}")
        results[path] = json.loads(run.stdout)
        print(f"{path}: ppl {results[path]['ppl']:.3f}", file=sys.stderr, flush=True)
    reference = results.get("reference")
    print(f"command: python bench/decode_quality.py {' '.join(sys.argv[1:])}\n")
    print(f"{len(ids) - 1} tokens teacher-forced, one forward a token, {args.kv} cache, {model_path}\n")
    print("| path | perplexity | top-1 = reference's | decode tok/s |\n|---|--:|--:|--:|")
    for path, r in results.items():
        agree = (f"{sum(a == b for a, b in zip(r['tops'], reference['tops'])) / len(r['tops']):.1%}"
                 if reference else "-")
        print(f"| {path} | {r['ppl']:.3f} | {agree} | {r['tok_s']:.1f} |")


if __name__ == "__main__":
    main()
