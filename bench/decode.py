"""Prefill and decode speed of wren next to llama-cpp-python: the same source model, the same prompt ids.

    python bench/decode.py          # the matrix below, 3 repeats (~5 min on 2 cores)
    python bench/decode.py --wren tq4 --kv f16 --llama Q4_K_M --prompt-tokens 512 --repeat 1   # a quick look
    python bench/decode.py --json   # one JSON object instead of tables

Rows: wren with each of --wren's weights (`tq4`, `tq3`: what `wren quantize --bits 4|3` writes, made once and
cached; `gguf`: the source GGUF as `wren run` loads it, its quantized weights as int8 levels; `gguf-blocks`: as
`wren run --low-memory` loads it, its linear layers read in their block formats) under each of --kv's cache
types, and llama-cpp-python with
each of --llama's types (llama.cpp's own requantization of the same weights, cached; see _llama_requant.py).
Each repeat of a row is a fresh child process (so load time and peak RSS are its own): it loads the model,
warms up on 32 tokens, then for each --prompt-tokens length prefills that prompt into a fresh cache (chunks
of 512) and decodes --decode-tokens greedy tokens one forward each (wren: wren.speed._one_run, what
`wren bench` times; --sample: drawn with Ollama's default options by each engine's own sampler). Prompt
ids are tokenized once, by wren.
Shown: the median and the min over repeats; load time is the model load inside the child (the files are in
the page cache after the first repeat). Timings are printed, never asserted: only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _llama_requant  # noqa: E402

CHUNK = 512  # llama.cpp's n_batch: wren prefills in chunks of the same size (generation.PREFILL_CHUNK)
WREN_BITS = {"tq4": 4, "tq3": 3}  # weights made by `wren quantize --bits N` (its default recipe)
# the llama.cpp row each wren row is compared with
# --sample: Ollama's defaults (wren's too), applied by each engine's own sampler
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}
PAIRS = {"tq4": "Q4_K_M", "tq3": "Q3_K_M", "gguf": "Q4_K_M", "gguf-blocks": "Q4_K_M"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompt_ids(model_path: Path, n: int, file: str | None) -> list[int]:
    from wren.tokenizer import Tokenizer
    from wren.weights.gguf import GGUFFile, tokenizer_metadata

    shared = REPO.parent / "shared" / "data" / "prideprejudice.txt"
    text_file = Path(file) if file else shared
    if not text_file.exists():
        raise SystemExit(f"no prompt text at {text_file}: pass --file")
    tok = Tokenizer.from_gguf_metadata(tokenizer_metadata(GGUFFile(model_path)))
    ids = tok.encode(text_file.read_text(encoding="utf-8", errors="replace"), add_bos=True)
    while len(ids) < n:  # a short text is repeated (without its BOS) until it is long enough
        ids += ids[1:] or ids
    return ids[:n]


def wren_weights(source: Path, name: str) -> Path:
    """The weights of row `name`: the source itself, or `wren quantize` of it (written once, cached)."""
    if name in ("gguf", "gguf-blocks"):
        return source
    out = _llama_requant.cache_dir(source) / f"wren-{name}"
    if out.exists():
        return out
    log(f"wren quantize --bits {WREN_BITS[name]} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        subprocess.run([sys.executable, "-m", "wren", "quantize", str(source), "--bits", str(WREN_BITS[name]),
                        "-o", f"{tmp}/model", "--quiet"], check=True)
        os.replace(f"{tmp}/model", out)
    return out


def child_wren(path: Path, kv: str, ids: list[int], lengths: list[int], decode: int, threads: int,
               in_place: bool = False, sample: bool = False) -> dict:
    import torch

    import wren
    from wren.quant import folder
    from wren.sampling import Options, make_sampler
    from wren.speed import _one_run  # what `wren bench` times: chunked prefill, then one forward a token

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = wren.load(path, int8=True, in_place=in_place)  # as `wren run [--low-memory]` loads it
    load_s = time.perf_counter() - t0
    sampler = make_sampler(Options(**SAMPLING, seed=0)) if sample else None
    with torch.inference_mode():
        _one_run(model, ids[:32], 4, kv, sampler)  # warm-up
        runs = {n: _one_run(model, ids[:n], decode, kv, sampler) for n in lengths}
    return {"load_s": load_s, "bits": folder.linear_bits_per_weight(model), "runs": runs}


def child_llama(path: Path, ids: list[int], lengths: list[int], decode: int, threads: int,
                sample: bool = False) -> dict:
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=max(lengths) + decode + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=CHUNK, verbose=False, logits_all=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # logits_all=False keeps llm.scores empty: read the last row from the context
        return int(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def run(prompt: list[int], steps: int) -> tuple[float, float]:
        """(seconds to the first token, seconds per decoded token), as wren.speed._one_run."""
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)  # chunks of n_batch internally
        token = greedy()
        t1 = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = greedy()
        return t1 - t0, (time.perf_counter() - t1) / steps

    def run_sampled(prompt: list[int], steps: int) -> tuple[float, float]:
        """The same, each token drawn by llama.cpp's sampler chain as `Llama.generate` (its users) runs it."""
        llm.reset()  # no prefix reuse from the last run
        t0 = time.perf_counter()
        for n, _ in enumerate(llm.generate(prompt, top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"], min_p=0.0,
                                           temp=SAMPLING["temperature"], repeat_penalty=SAMPLING["repeat_penalty"])):
            if n == 0:
                t1 = time.perf_counter()
            if n == steps:
                break
        return t1 - t0, (time.perf_counter() - t1) / steps

    timed = run_sampled if sample else run
    timed(ids[:32], 4)  # warm-up
    runs = {n: timed(ids[:n], decode) for n in lengths}
    llm.close()
    return {"load_s": load_s, "bits": _llama_requant.stats(path)["linear_bits"], "runs": runs}


def child_main(args) -> None:
    from _peak import peak_rss_mb

    ids = json.loads(Path(args.ids_file).read_text())
    lengths = [int(n) for n in args.prompt_tokens.split(",")]
    engine, path, kv = json.loads(args.child)
    if engine.startswith("wren"):
        out = child_wren(Path(path), kv, ids, lengths, args.decode_tokens, args.threads, engine == "wren-in-place",
                         args.sample)
    else:
        out = child_llama(Path(path), ids, lengths, args.decode_tokens, args.threads, args.sample)
    out["rss_mb"] = peak_rss_mb()
    print(json.dumps(out), flush=True)


def run_child(row: dict, args, ids_file: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    engine = "wren-in-place" if row.get("weights") == "gguf-blocks" else row["engine"]
    cmd = [sys.executable, __file__, "--child", json.dumps([engine, str(row["path"]), row["kv"]]),
           "--ids-file", ids_file, "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens),
           "--prompt-tokens", args.prompt_tokens] + (["--sample"] if args.sample else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def rows_for(args, source: Path) -> list[dict]:
    rows = []
    for w in [w for w in args.wren.split(",") if w]:
        if w not in ("gguf", "gguf-blocks") and w not in WREN_BITS:
            raise SystemExit(f"unknown wren weights {w!r}: choose from gguf, gguf-blocks, {', '.join(WREN_BITS)}")
        path = wren_weights(source, w)
        rows += [{"engine": "wren", "weights": w, "kv": kv, "path": path} for kv in args.kv.split(",") if kv]
    llama = [t for t in args.llama.split(",") if t]
    if llama:
        if importlib.util.find_spec("llama_cpp") is None:
            log("llama-cpp-python is absent (pip install llama-cpp-python): its rows are left out")
            return rows
        if why := _llama_requant.unusable_build():
            log(f"{why}: llama.cpp's rows are left out")
            return rows
        f32 = _llama_requant.f32_gguf(source, log)
        for t in llama:
            path, why = _llama_requant.requantized(f32, t, args.threads, log)
            rows.append({"engine": "llama.cpp", "weights": t, "kv": "f16", "path": path, "error": why})
    return rows


def summarize(row: dict, repeats: list[dict], lengths: list[int]) -> dict:
    ok = [r for r in repeats if "error" not in r]
    out = {k: row[k] for k in ("engine", "weights", "kv")} | {"path": str(row["path"])}
    if not ok:
        return out | {"error": row.get("error") or repeats[-1]["error"]}

    def stat(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values)}

    out |= {"bits": ok[0]["bits"], "repeats": len(ok), "load_s": stat([r["load_s"] for r in ok]),
            "rss_mb": stat([r["rss_mb"] for r in ok]), "prompts": {}}
    for n in lengths:
        pre = [n / r["runs"][str(n)][0] for r in ok]
        dec = [1 / r["runs"][str(n)][1] for r in ok]
        ttft = [r["runs"][str(n)][0] for r in ok]
        out["prompts"][n] = {"prefill_tok_s": stat(pre), "decode_tok_s": stat(dec), "ttft_s": stat(ttft)}
    return out


def peer_of(weights: str, peers: dict) -> str | None:
    """The llama.cpp type a wren row is compared with: its PAIRS type, or else the only llama.cpp row (a source
    of another type, e.g. --llama Q3_K_M beside --wren gguf of a Q3_K_M file)."""
    if PAIRS.get(weights) in peers:
        return PAIRS[weights]
    return next(iter(peers)) if len(peers) == 1 else None


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def tables(results: list[dict], lengths: list[int]) -> str:
    def mm(s: dict, fmt: str) -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}})"

    speed, peers = [], {r["weights"]: r for r in results if r["engine"] == "llama.cpp" and "error" not in r}
    for r in results:
        name = f"{r['engine']} {r['weights']}" + (f" / kv {r['kv']}" if r["engine"] == "wren" else "")
        if "error" in r:
            speed.append([name, "error: " + r["error"], *[""] * 6])
            continue
        for n in lengths:
            p = r["prompts"][n]
            peer_type = peer_of(r["weights"], peers)
            peer = peers.get(peer_type)
            ratio = (f"{p['decode_tok_s']['median'] / peer['prompts'][n]['decode_tok_s']['median']:.2f}x / "
                     f"{p['prefill_tok_s']['median'] / peer['prompts'][n]['prefill_tok_s']['median']:.2f}x"
                     if peer and r["engine"] == "wren" else "")
            speed.append([name, f"{r['bits']:.2f}", str(n), mm(p["prefill_tok_s"], ".1f"),
                          mm(p["decode_tok_s"], ".1f"), mm(p["ttft_s"], ".3f"),
                          f"{ratio} vs {peer_type}" if ratio else ""])
    memory = [[f"{r['engine']} {r['weights']}" + (f" / kv {r['kv']}" if r["engine"] == "wren" else ""),
               mm(r["load_s"], ".2f"), mm(r["rss_mb"], ".0f")] for r in results if "error" not in r]
    return ("## Speed: median (min) over repeats\n\n"
            + markdown(["row", "bits/weight (linear)", "prompt", "prefill tok/s", "decode tok/s", "time to first "
                        "token s", "decode / prefill vs llama.cpp"], speed)
            + "\n\n## Load and memory: median (min) over repeats\n\n"
            + markdown(["row", "load s", f"peak RSS MB (prompts up to {max(lengths)})"], memory))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wren", default="tq4,tq3", help="wren weights: tq4, tq3 (wren quantize), gguf (the source), "
                    "gguf-blocks (the source, --low-memory)")
    ap.add_argument("--kv", default="f16,tq3.5", help="wren KV cache types, each a row per weights")
    ap.add_argument("--llama", default="Q4_K_M,Q3_K_M", help="llama.cpp types (requantized from the source)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", default="32,512,2048")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="the source GGUF (default: wren's default model)")
    ap.add_argument("--file", default=None, help="prompt text (default ../shared/data/prideprejudice.txt)")
    ap.add_argument("--sample", action="store_true", help="draw each token as Ollama's defaults do (temperature "
                    "0.8, top_k 40, top_p 0.9, repeat penalty 1.1), by each engine's own sampler; default greedy")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return

    import torch

    from wren.weights.load import DEFAULT_MODEL, resolve

    source = resolve(str(args.model) if args.model else DEFAULT_MODEL)
    lengths = [int(n) for n in args.prompt_tokens.split(",")]
    load_before = os.getloadavg()[0]
    rows = rows_for(args, source)
    ids = prompt_ids(source, max(lengths), args.file)
    results = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    try:
        for row in rows:
            repeats = []
            for i in range(args.repeat if not row.get("error") else 0):
                repeats.append(run_child(row, args, f.name))
                log(f"{row['engine']} {row['weights']} kv {row['kv']} repeat {i + 1}: "
                    + (repeats[-1].get("error") or "ok"))
            results.append(summarize(row, repeats or [{"error": row.get("error")}], lengths))
    finally:
        os.unlink(f.name)
    load_after = os.getloadavg()[0]
    machine = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": args.threads, "prompt_tokens": lengths, "decode_tokens": args.decode_tokens,
               "repeat": args.repeat, "sampling": SAMPLING if args.sample else "greedy", "source": str(source),
               "loadavg_before": load_before, "loadavg_after": load_after}
    if args.json:
        print(json.dumps({"machine": machine, "results": results}))
        return
    print("command: python bench/decode.py " + " ".join(sys.argv[1:]))
    print(tables(results, lengths))
    print(f"\n{machine['cpus']} CPUs ({machine['cpu']}), torch {machine['torch']}, {args.threads} threads, "
          f"{args.decode_tokens} decoded tokens ({'sampled' if args.sample else 'greedy'}), {args.repeat} repeats; "
          f"source {source.name}; 1-minute load average {load_before:.2f} before, {load_after:.2f} after")


if __name__ == "__main__":
    main()
