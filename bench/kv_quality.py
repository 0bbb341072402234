"""KV cache types on real weights: perplexity, KL and top-1 against the f16 cache, needle retrieval, bytes and speed.

    python bench/kv_quality.py                                  # the full run (long on a laptop CPU)
    python bench/kv_quality.py --ctx 2048 --needle-lengths 1024,2048 --seeds 2 --speed-ctx 1024

Every wren row runs the default model (or --model) through `wren.kv.make_kv_cache` of its type, prefilled
in chunks of 512 so the cache is really written and read: each query attends to what the cache holds.
- perplexity: one window per context (--chunks more) of `../shared/data/prideprejudice.txt`, BOS first,
  the second half scored, as `wren perplexity` and llama.cpp do; mean KL(f16 || type) on up to 256 of the
  scored positions (evenly spaced) and top-1 agreement with the f16 cache on all of them;
- llama-cpp-python's f16, q8_0 and q4_0 caches (flash attention) on the same tokens, up to --llama-max-ctx
  (its logits_all holds [ctx, vocab] floats: 8.6 GB at 8k);
- needle: "The secret passkey is NNNNN." at 5 depths of a slice of the novel, then "What is the secret
  passkey?"; greedy; a cell counts only where the f16 cache retrieves;
- bytes per cached token and decode tokens/s after a prompt of each --speed-ctx length.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 512
KL_POSITIONS = 256
NEEDLE = "The secret passkey is {key}. Remember it: the secret passkey is {key}."
QUESTION = "\n\nWhat is the secret passkey? The secret passkey is"
LLAMA_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prefill(model, ids: list[int], cache, keep_from: int):
    """Run ids through the cache in chunks; yield (start, logits [n, V]) for chunks from `keep_from` on."""
    import torch

    for s in range(0, len(ids), CHUNK):
        chunk = ids[s:s + CHUNK]
        end = s + len(chunk)
        keep = max(0, end - max(keep_from, s))
        logits = model(torch.tensor([chunk]), cache, logits_to_keep=keep if keep else 1)
        if keep:
            yield end - keep, logits[0].float()


def score_window(model, ids: list[int], spec: str, ref: dict | None) -> dict:
    """NLL of the second half; with `ref` (the f16 run's), KL and top-1 against it."""
    import torch

    from wren.kv import make_kv_cache

    first = len(ids) // 2
    kl_every = max(1, (len(ids) - first - 1) // KL_POSITIONS)
    nll, top1, kl, keep = [], [], [], {} if ref is None else None
    with torch.inference_mode():
        cache = make_kv_cache(model, batch=1, max_len=len(ids), spec=spec)
        for start, logits in prefill(model, ids, cache, first):
            logp = torch.log_softmax(logits, -1)
            for i in range(logits.shape[0]):
                pos = start + i
                if pos >= len(ids) - 1:
                    continue
                nll.append(-float(logp[i, ids[pos + 1]]))
                top1.append(int(logp[i].argmax()))
                if (pos - first) % kl_every == 0:
                    if ref is None:
                        keep[pos] = logp[i].half()
                    else:
                        p = ref["logp"][pos].float()
                        kl.append(float((p.exp() * (p - logp[i])).sum()))
    out = {"nll": nll, "top1": top1}
    if ref is None:
        out["logp"] = keep
    else:
        out["kl"] = statistics.mean(kl)
        out["top1_agree"] = sum(a == b for a, b in zip(top1, ref["top1"])) / len(top1)
    return out


def llama_window(gguf: Path, ids: list[int], kv: str, threads: int) -> list[float]:
    import numpy as np
    from _llama_requant import check_build
    from llama_cpp import Llama

    check_build()
    llm = Llama(model_path=str(gguf), n_ctx=len(ids), n_batch=CHUNK, logits_all=True, flash_attn=True,
                type_k=LLAMA_TYPES[kv], type_v=LLAMA_TYPES[kv], n_threads=threads, n_threads_batch=threads,
                verbose=False)
    try:
        llm.eval(ids)
        first = len(ids) // 2
        nll = []
        for pos in range(first, len(ids) - 1):
            row = np.asarray(llm.scores[pos], dtype=np.float64)
            m = row.max()
            nll.append(float(m + math.log(np.exp(row - m).sum()) - row[ids[pos + 1]]))
        return nll
    finally:
        llm.close()


def needle_prompt(tok, text_ids: list[int], length: int, depth: float, rng: random.Random) -> tuple[list[int], str]:
    key = str(rng.randrange(10000, 100000))
    needle = tok.encode(" " + NEEDLE.format(key=key) + " ")
    question = tok.encode(QUESTION)
    room = length - len(needle) - len(question) - 1
    start = rng.randrange(0, len(text_ids) - room)
    hay = text_ids[start:start + room]
    at = int(depth * len(hay))
    return [tok.bos_id, *hay[:at], *needle, *hay[at:], *question], key


def greedy(model, ids: list[int], spec: str, steps: int) -> list[int]:
    import torch

    from wren.kv import make_kv_cache

    with torch.inference_mode():
        cache = make_kv_cache(model, batch=1, max_len=len(ids) + steps + 1, spec=spec)
        logits = None
        for _, logits in prefill(model, ids, cache, len(ids) - 1):
            pass
        out = [int(logits[-1].argmax())]
        for _ in range(steps - 1):
            out.append(int(model(torch.tensor([[out[-1]]]), cache, logits_to_keep=1)[0, -1].argmax()))
    return out


def decode_speed(model, ids: list[int], spec: str, steps: int = 16) -> float:
    import torch

    from wren.kv import make_kv_cache

    with torch.inference_mode():
        cache = make_kv_cache(model, batch=1, max_len=len(ids) + steps + 1, spec=spec)
        for _ in prefill(model, ids, cache, len(ids)):
            pass
        token, times = ids[-1], []
        for _ in range(steps):
            t0 = time.perf_counter()
            token = int(model(torch.tensor([[token]]), cache, logits_to_keep=1)[0, -1].argmax())
            times.append(time.perf_counter() - t0)
    return 1 / statistics.median(times)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=str(REPO.parent / "shared" / "data" / "prideprejudice.txt"))
    ap.add_argument("--model", default=None, help="a GGUF (default: wren's default model)")
    ap.add_argument("--types", default="f16,q8,tq4,tq3.5,tq3,tq2.5")
    ap.add_argument("--ctx", default="2048,8192", help="perplexity contexts")
    ap.add_argument("--chunks", type=int, default=1, help="windows per context")
    ap.add_argument("--llama-max-ctx", type=int, default=4096)
    ap.add_argument("--needle-lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--speed-ctx", default="1024,8192")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-needle", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    print("command: python bench/kv_quality.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:]))
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    import torch

    import wren
    from wren.kv import kv_bytes_per_token
    from wren.perplexity import windows
    from wren.weights.load import DEFAULT_MODEL, resolve

    torch.set_num_threads(args.threads)
    types = [t for t in args.types.split(",") if t]
    if types[0] != "f16":
        types.insert(0, "f16")  # the reference every other type is read against
    gguf = resolve(args.model or DEFAULT_MODEL)
    model = wren.load(gguf)
    tok = model.tokenizer
    text_ids = tok.encode(Path(args.file).read_text(encoding="utf-8"))
    result = {"types": types, "ppl": {}, "llama": {}, "needle": {}, "speed": {}, "bytes": {}}
    f16_bytes = kv_bytes_per_token(model, "f16")
    for t in types:
        result["bytes"][t] = kv_bytes_per_token(model, t)

    for ctx in [int(c) for c in args.ctx.split(",") if c]:
        for w_i, ids in enumerate(windows(text_ids, ctx, args.chunks, tok.bos_id)):
            ref = None
            for t in types:
                t0 = time.perf_counter()
                r = score_window(model, ids, t, ref)
                if ref is None:
                    ref = r
                row = result["ppl"].setdefault(f"{ctx}/{t}", {"nll": [], "kl": [], "top1": []})
                row["nll"] += r["nll"]
                if "kl" in r:
                    row["kl"].append(r["kl"])
                    row["top1"].append(r["top1_agree"])
                log(f"ppl ctx {ctx} window {w_i} {t}: {math.exp(statistics.mean(r['nll'])):.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
            if not args.skip_llama and ctx <= args.llama_max_ctx:
                for kv in LLAMA_TYPES:
                    try:
                        nll = llama_window(gguf, ids, kv, args.threads)
                    except Exception as exc:  # report, do not stop the run
                        log(f"llama.cpp {kv} at {ctx} failed: {exc!r}")
                        continue
                    result["llama"].setdefault(f"{ctx}/{kv}", []).extend(nll)
                    log(f"llama.cpp ctx {ctx} {kv}: {math.exp(statistics.mean(nll)):.4f}")

    if not args.skip_needle:
        depths = [float(d) for d in args.depths.split(",")]
        for length in [int(n) for n in args.needle_lengths.split(",") if n]:
            for seed in range(args.seeds):
                for depth in depths:
                    rng = random.Random(f"{length}/{seed}/{depth}")
                    ids, key = needle_prompt(tok, text_ids, length, depth, rng)
                    found = {}
                    for t in types:
                        out = tok.decode(greedy(model, ids, t, 8))
                        found[t] = key in re.sub(r"\D", "", out)
                        if t == "f16" and not found[t]:
                            break  # f16 misses it: the cell does not count
                    log(f"needle {length} seed {seed} depth {depth}: {found}")
                    if found.get("f16"):
                        for t in types:
                            cell = result["needle"].setdefault(t, {})
                            hit, n = cell.get(length, (0, 0))
                            cell[length] = (hit + found[t], n + 1)
                    else:
                        result["needle"].setdefault("f16 misses", {}).setdefault(length, 0)
                        result["needle"]["f16 misses"][length] += 1

    if not args.skip_speed:
        for n in [int(c) for c in args.speed_ctx.split(",") if c]:
            ids = [tok.bos_id] + text_ids[:n - 1]
            for t in types:
                result["speed"][f"{n}/{t}"] = decode_speed(model, ids, t)
                log(f"decode after {n} tokens, {t}: {result['speed'][f'{n}/{t}']:.2f} tok/s")

    if args.json:
        print(json.dumps(result, default=str))
        return
    rows = []
    for key, r in result["ppl"].items():
        ctx, t = key.split("/", 1)
        ppl = math.exp(statistics.mean(r["nll"]))
        base = math.exp(statistics.mean(result["ppl"][f"{ctx}/f16"]["nll"]))
        rows.append([f"wren {t}", ctx, len(r["nll"]), f"{ppl:.4f}", f"{100 * (ppl / base - 1):+.2f}%",
                     f"{statistics.mean(r['kl']):.4f}" if r["kl"] else "-",
                     f"{100 * statistics.mean(r['top1']):.1f}%" if r["top1"] else "-",
                     result["bytes"][t], f"{f16_bytes / result['bytes'][t]:.2f}x"])
    for key, nll in result["llama"].items():
        ctx, kv = key.split("/", 1)
        ppl = math.exp(statistics.mean(nll))
        base = result["llama"].get(f"{ctx}/f16")
        rel = f"{100 * (ppl / math.exp(statistics.mean(base)) - 1):+.2f}%" if base else "-"
        rows.append([f"llama.cpp {kv}", ctx, len(nll), f"{ppl:.4f}", rel + " (vs its f16)", "-", "-", "-", "-"])
    if rows:
        print("\n## Perplexity against the f16 cache\n")
        print(table(["cache", "ctx", "scored", "ppl", "vs f16", "mean KL", "top-1 vs f16", "bytes/token",
                     "less than f16"], rows))
    if result["needle"]:
        lengths = sorted({n for t, cells in result["needle"].items() if t != "f16 misses" for n in cells})
        print("\n## Needle retrieval (retrieved / cells where the f16 cache retrieves)\n")
        nrows = [[t, *(f"{cells[n][0]}/{cells[n][1]}" if n in cells else "-" for n in lengths)]
                 for t, cells in result["needle"].items() if t != "f16 misses"]
        misses = result["needle"].get("f16 misses", {})
        nrows.append(["(f16 misses, not counted)", *(misses.get(n, 0) for n in lengths)])
        print(table(["cache", *map(str, lengths)], nrows))
    if result["speed"]:
        ns = sorted({int(k.split("/")[0]) for k in result["speed"]})
        print("\n## Decode tokens/s after a prompt of N tokens\n")
        print(table(["cache", *map(str, ns)], [[t, *(f"{result['speed'][f'{n}/{t}']:.2f}" for n in ns)]
                                               for t in types]))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
