"""Serving throughput: aggregate tokens/s and time to first token of `wren serve` next to llama.cpp's
OpenAI server (`python -m llama_cpp.server`), same GGUF, same prompts, same threads, in one run.

    python bench/serve.py                                  # 1, 4 and 16 concurrent clients, 64 tokens each
    python bench/serve.py --clients 1,8 --tokens 32 --requests 2 --json
    python bench/serve.py --servers wren,wren-low-memory,llama.cpp   # and `wren serve --low-memory`

Each server runs as its own process on a free loopback port and is warmed up first. Every client streams
raw completions (POST /v1/completions, temperature 0, or with --sample Ollama's default sampling; a
different prompt per client) back to back; time to first token is measured from sending the request to the
first streamed piece, and the aggregate rate is all streamed pieces (one per token on both servers) over
the wall time of the round. wren batches
concurrent requests (--parallel, default 16 here); llama-cpp-python's server runs one at a time, the
others wait (its interrupt_requests is turned off so a waiting request does not cut the running one off).
Timings are printed, never asserted: they are only as quiet as the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["The history of the printing press", "A recipe for bread starts with", "The tallest mountains on Earth",
           "In the year 1850, the city of London", "Photosynthesis is the process by which",
           "The rules of chess say that", "A short story about a lighthouse keeper:", "The Python language was",
           "Rivers carry sediment toward", "The first computers were built", "Whales are mammals that",
           "A good night's sleep helps", "The moon's phases happen because", "Jazz music began in",
           "Volcanoes form when", "The library was quiet until"]

SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(cmd: list[str], url: str, env: dict, log) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:3]} exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{cmd[:3]} did not start; see {log.name}")


def one_request(url: str, model: str, prompt: str, tokens: int, sampling: dict) -> tuple[float, int, float]:
    """(time to first token, tokens streamed, seconds) of one streamed completion."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "stream": True, **sampling}
    t0 = time.perf_counter()
    first, count = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                count += 1
                if first is None:
                    first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0), count, time.perf_counter() - t0


def round_(url: str, model: str, clients: int, requests: int, tokens: int, sampling: dict) -> dict:
    ttfts, counts = [], []
    lock = threading.Lock()

    def client(i):
        for j in range(requests):
            ttft, n, _ = one_request(url, model, PROMPTS[(i + j * clients) % len(PROMPTS)], tokens, sampling)
            with lock:
                ttfts.append(ttft)
                counts.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    return {"clients": clients, "requests": len(ttfts), "tokens": sum(counts), "seconds": wall,
            "tokens_per_s": sum(counts) / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]}


def _missing_llama_server() -> str | None:
    import importlib.util

    for mod in ("llama_cpp", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings", "uvicorn"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    from _llama_requant import unusable_build

    return unusable_build()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the embedded Gemma 3 270M)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=1, help="requests per client per round")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--parallel", type=int, default=16, help="wren's --parallel (sequences batched together)")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--servers", default="wren,llama.cpp", help="of wren, wren-low-memory (--low-memory), llama.cpp")
    ap.add_argument("--sample", action="store_true", help="Ollama's default sampling in every request (temperature "
                    "0.8, top_k 40, top_p 0.9, repeat_penalty 1.1; both servers take these fields); default greedy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sampling = SAMPLED if args.sample else {"temperature": 0}

    from wren.weights.load import default_model_path

    gguf = Path(args.model) if args.model else default_model_path()
    clients = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="wren-bench-serve-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results, notes = [], []
    for server in args.servers.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(work / f"{server}.log", "w")
        if server in ("wren", "wren-low-memory"):
            from wren.store import ModelStore

            store = ModelStore(work / "models")
            name = store.pull(str(gguf), name="bench")
            cmd = [sys.executable, "-m", "wren", "serve", "--port", str(port), "--parallel", str(args.parallel)]
            cmd += ["--low-memory"] if server == "wren-low-memory" else []
            proc = start(cmd, url, {**env, "WREN_MODELS": str(work / "models")}, log)
            model = name
        elif server == "llama.cpp":
            missing = _missing_llama_server()
            if missing:
                notes.append(f"llama.cpp skipped: {missing} (pip install 'wren-llm[peer]')")
                continue
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                   "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx),
                   "--interrupt_requests", "False"]
            proc = start(cmd, url, env, log)
            model = "bench"
        else:
            raise SystemExit(f"unknown server {server!r}")
        try:
            one_request(url, model, "Warm-up:", 4, sampling)
            for c in clients:
                results.append({"server": server, **round_(url, model, c, args.requests, args.tokens, sampling)})
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    load = os.getloadavg()[0]
    if load > args.threads * 0.75 + 0.5:
        notes.append(f"load average {load:.1f} at the end: other processes shared the CPUs")
    if args.json:
        print(json.dumps({"model": str(gguf), "threads": args.threads, "tokens": args.tokens, "sampling": sampling,
                          "results": results, "notes": notes}))
        return
    print(f"model {gguf.name}, {args.threads} threads, {args.tokens} tokens per request, "
          f"{args.requests} request(s) per client, wren --parallel {args.parallel}, "
          f"{'sampled (' + json.dumps(sampling) + ')' if args.sample else 'greedy'}")
    print(f"{'server':<10} {'clients':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9}")
    for r in results:
        print(f"{r['server']:<10} {r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['tokens_per_s']:>8.1f} "
              f"{r['ttft_p50']:>8.2f}s {r['ttft_p99']:>8.2f}s")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
