"""Prefill and decode speed of wren next to llama-cpp-python, on the same GGUF and the same prompt ids.

    python bench/decode.py                                  # default model, 2 threads, 512-token prompt, 64 decoded
    python bench/decode.py --threads 4 --prompt-tokens 1024 --decode-tokens 128 --repeat 3
    python bench/decode.py --engines wren --json            # one JSON object instead of a table

Each engine runs in its own child process (so peak RSS is its own) on the same prompt token ids
(tokenized once by wren's tokenizer), after a short warm-up. Prefill runs in chunks of 512; decode is
greedy (argmax), one token per forward, and its rate counts only the single-token steps. With
--repeat > 1 the median of each column is shown. Timings are printed, never asserted: they are only as
quiet as the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 512


def prompt_text(file: str | None) -> str:
    shared = REPO.parent / "shared" / "data" / "prideprejudice.txt"
    for p in (shared, Path(file) if file else None):
        if p is not None and p.exists():
            return p.read_text(encoding="utf-8", errors="replace")
    import importlib

    mods = ("argparse", "collections", "json", "os", "pathlib", "re", "subprocess", "typing", "unittest")
    return "\n\n".join(importlib.import_module(m).__doc__ or "" for m in mods)


def prompt_ids(model_path: Path, n: int, file: str | None) -> list[int]:
    from wren.tokenizer import Tokenizer
    from wren.weights.gguf import GGUFFile, tokenizer_metadata

    tok = Tokenizer.from_gguf_metadata(tokenizer_metadata(GGUFFile(model_path)))
    ids = tok.encode(prompt_text(file), add_bos=True)
    while len(ids) < n:  # a short text is repeated (without its BOS) until it is long enough
        ids += ids[1:] or ids
    return ids[:n]


def finish(result: dict) -> None:
    import resource

    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(result), flush=True)


def child_wren(path: Path, ids: list[int], decode: int, threads: int) -> None:
    import torch

    import wren

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = wren.load(path)
    load_s = time.perf_counter() - t0

    def run(prompt: list[int], steps: int):
        x = torch.tensor([prompt])
        cache = model.make_cache(batch=1, max_len=len(prompt) + steps + 8)
        t0 = time.perf_counter()
        for s in range(0, x.shape[1], CHUNK):
            logits = model(x[:, s:s + CHUNK], cache, logits_to_keep=1)
        t1 = time.perf_counter()
        out = [int(logits[0, -1].argmax())]
        for _ in range(steps):
            logits = model(torch.tensor([[out[-1]]]), cache, logits_to_keep=1)
            out.append(int(logits[0, -1].argmax()))
        return t1 - t0, time.perf_counter() - t1, out

    with torch.inference_mode():
        run(ids[:32], 4)  # warm-up
        pre_s, dec_s, out = run(ids, decode)
    finish({"engine": "wren", "load_s": load_s, "prefill_tps": len(ids) / pre_s,
            "decode_tps": decode / dec_s, "tokens": out})


def child_llama(path: Path, ids: list[int], decode: int, threads: int) -> None:
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=len(ids) + decode + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=CHUNK, verbose=False, logits_all=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:  # logits_all=False keeps llm.scores empty: read the last row from the context
        return int(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def run(prompt: list[int], steps: int):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)  # chunks of n_batch internally
        t1 = time.perf_counter()
        out = [last_argmax()]
        for _ in range(steps):
            llm.eval([out[-1]])
            out.append(last_argmax())
        return t1 - t0, time.perf_counter() - t1, out

    run(ids[:32], 4)  # warm-up
    pre_s, dec_s, out = run(ids, decode)
    finish({"engine": "llama.cpp", "load_s": load_s, "prefill_tps": len(ids) / pre_s,
            "decode_tps": decode / dec_s, "tokens": out})


def run_child(engine: str, args, ids_file: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", engine, "--ids-file", ids_file, "--model", str(args.model),
           "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"engine": engine, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    row = {k: statistics.median(r[k] for r in ok) for k in ("load_s", "prefill_tps", "decode_tps", "rss_mb")}
    return {"engine": ok[0]["engine"], **row, "tokens": ok[0]["tokens"], "runs": len(ok)}


def agreement(results: list[dict]) -> int | None:
    toks = [r["tokens"] for r in results if "tokens" in r]
    if len(toks) != 2:
        return None
    return next((i for i, (a, b) in enumerate(zip(*toks)) if a != b), min(map(len, toks)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--engines", default="wren,llama.cpp")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--file", default=None, help="prompt text when ../shared/data/prideprejudice.txt is absent")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.model is None:
        from wren.weights.load import default_model_path
        args.model = default_model_path()
    if args.child:
        ids = json.loads(Path(args.ids_file).read_text())
        (child_wren if args.child == "wren" else child_llama)(args.model, ids, args.decode_tokens, args.threads)
        return

    try:
        import llama_cpp
        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    import torch

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - {"wren", "llama.cpp"}:
        ap.error(f"unknown engine(s) {', '.join(sorted(unknown))}: choose from wren, llama.cpp")
    notes = []
    if "llama.cpp" in engines and llama_version is None:
        engines.remove("llama.cpp")
        notes.append("llama-cpp-python is absent (pip install llama-cpp-python): only wren was run")

    load_before = os.getloadavg()[0]
    ids = prompt_ids(args.model, args.prompt_tokens, args.file)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    try:
        results = [summarize([run_child(e, args, f.name) for _ in range(args.repeat)]) for e in engines]
    finally:
        os.unlink(f.name)

    same = agreement(results)
    load_after = os.getloadavg()[0]
    # The run itself lifts the load by up to `threads`; more than that, or a busy start, means company.
    if load_before > 0.5 * (os.cpu_count() or 1) or load_after - load_before > args.threads:
        notes.append(f"1-minute load average was {load_before:.1f} before and {load_after:.1f} after on "
                     f"{os.cpu_count()} CPUs: other processes may have shared them, so the numbers may be noisy")
    machine = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "llama_cpp": llama_version, "threads": args.threads, "prompt_tokens": len(ids),
               "decode_tokens": args.decode_tokens, "repeat": args.repeat, "model": str(args.model),
               "loadavg_before": load_before, "loadavg_after": load_after}
    if args.json:
        print(json.dumps({"machine": machine, "results": [{k: v for k, v in r.items() if k != "tokens"}
                                                          for r in results], "greedy_agree": same, "notes": notes}))
        return

    header = ["engine", "load s", "prefill tok/s", "decode tok/s", "peak RSS MB"]
    rows = [[r["engine"], "error: " + r["error"], "", "", ""] if "error" in r else
            [r["engine"], f"{r['load_s']:.2f}", f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.1f}",
             f"{r['rss_mb']:.0f}"] for r in results]
    info = (f"{machine['cpus']} CPUs ({machine['cpu']}), torch {machine['torch']}, llama_cpp {llama_version}, "
            f"{args.threads} threads, prompt {len(ids)} tokens, decode {args.decode_tokens} tokens, "
            f"repeat {args.repeat}; model {Path(args.model).name}")
    if same is not None:
        notes.append(f"greedy tokens agree for the first {same} of {args.decode_tokens + 1}")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="decode benchmark")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for row in [header, ["-" * w for w in widths], *rows]:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(info)
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
