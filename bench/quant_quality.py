"""Quality and size of wren's TurboQuant rows next to llama.cpp's quantization types, in one table.

    python bench/quant_quality.py                            # every row (~35 min on 2 shared cores)
    python bench/quant_quality.py --only llama --chunks 1    # a quick look at llama.cpp's rows
    python bench/quant_quality.py --configs tq4,Q4_K_M --json

The reference is the default model (a Gemma 3 270M GGUF) dequantized to fp32 in wren. Every row is scored
on the same token ids (the text tokenized once by wren's tokenizer) and the same windows as
`wren perplexity` / llama.cpp's perplexity tool: `--ctx` tokens each, BOS first, the second half scored.
Per scored token it measures the NLL of the next token, KL(P_ref || P_row) over the whole vocabulary, and
whether the two argmaxes agree (llama.cpp's --kl-divergence measures); the reference's log-probabilities
of the scored positions are kept in memory once, as float16 (about 0.8 GB for 6 windows of 512).

wren rows: `wren.quant.folder.quantize_model(model, **row)` for each dict of WREN_ROWS (all keys but
"name" are passed through), saved with `folder.save` to a temp folder for the file size.
llama.cpp rows: the reference written as an F32 GGUF (every metadata key of the source kept) and requantized
with llama-cpp-python's `llama_model_quantize`, token embedding at Q8_0 like wren's embed_bits=8; each file
is evaluated by llama-cpp-python on the same ids. The F32 GGUF and the requantized files are cached under
~/.cache/wren/bench/ (see _llama_requant.py). The llama.cpp F32 row doubles as a check of that path: its
perplexity must be within 0.5% of wren's fp32 reference, and its KL is the floor that two engines reach
on identical weights.

Decode tok/s: a 32-token prompt, then 64 greedy tokens one forward each, on --threads threads; the rate is
one over the median single-token step, the best of --decode-repeat runs (the median and the best shrug off
steps and runs that another process interrupted: on 2 shared cores llama.cpp's spinning threads stall badly).
Timings are printed, never asserted: they are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _llama_requant  # noqa: E402

# The wren rows, in table order: the first (no "bits") is the reference itself, unquantized. Every key but
# "name" goes to wren.quant.folder.quantize_model as a keyword argument.
WREN_ROWS = [
    {"name": "fp32"},
    {"name": "tq4", "bits": 4, "group": 0, "embed_bits": 8},
    {"name": "tq4-plain", "bits": 4, "group": 0, "embed_bits": 8, "input_scales": False},
    {"name": "tq4-g128", "bits": 4, "group": 128, "embed_bits": 8},
    # what `wren quantize --bits 4` writes: groups of 128, v_proj two bits up
    {"name": "tq4-cli", "bits": 4, "group": 128, "embed_bits": 8, "module_bits": {"*.v_proj": 6}},
    {"name": "tq4-kvo5", "bits": 4, "group": 0, "embed_bits": 8,
     "module_bits": {"*.k_proj": 5, "*.v_proj": 5, "*.o_proj": 5}},
    {"name": "tq3", "bits": 3, "group": 0, "embed_bits": 8},
    {"name": "tq3-kvo4", "bits": 3, "group": 0, "embed_bits": 8,
     "module_bits": {"*.k_proj": 4, "*.v_proj": 4, "*.o_proj": 4}},
    {"name": "tq3-kv5o4", "bits": 3, "group": 0, "embed_bits": 8,
     "module_bits": {"*.k_proj": 4, "*.v_proj": 5, "*.o_proj": 4}},
    {"name": "tq2", "bits": 2, "group": 0, "embed_bits": 8},
]
# llama.cpp's rows: "F32" is the unquantized reference GGUF (the check); the rest are llama_model_quantize
# ftypes (LLAMA_FTYPE_MOSTLY_<name>).
LLAMA_ROWS = ["F32", *_llama_requant.LLAMA_TYPES]

PROMPT_TOKENS, DECODE_TOKENS = 32, 64
KL_ROWS = 64  # scored positions per KL step: bounds the float32 temporaries to a few 64 MB arrays
CHECK_TOLERANCE = 0.005


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Reference:
    """The reference's log-probabilities (float16) and argmax (exact) at every scored position, and the
    accumulator that scores another model's logits against them.

    float16 halves the memory (0.8 GB for 6 windows of 512), but its rounding alone moves a KL by ~1e-5,
    the size of the KL between two engines on identical weights. So each position also keeps the KL that
    rounding gives the reference against itself, sum p16 (r16 - r32), and subtracts it: to first order
    that is the error of KL(p16 || q) for any q near the reference, and the reference scores exactly 0."""

    def __init__(self, windows: list[list[int]], first: int):
        import torch

        self.first = first
        self.targets = [torch.tensor(w[first + 1:]) for w in windows]
        self.logp: list = [None] * len(windows)
        self.top: list = [None] * len(windows)
        self.bias: list = [None] * len(windows)

    def keep(self, i: int, logits) -> None:
        import torch

        self.logp[i] = torch.cat([torch.log_softmax(logits[s:s + KL_ROWS].float(), dim=-1).half()
                                  for s in range(0, logits.shape[0], KL_ROWS)])
        self.top[i] = logits.argmax(-1)
        self.bias[i] = torch.zeros(logits.shape[0], dtype=torch.float64)  # so that _kl gives the raw value
        self.bias[i] = torch.tensor(self._kl(i, logits), dtype=torch.float64)

    def _kl(self, i: int, logits) -> list[float]:
        import torch

        kl = []
        for s in range(0, logits.shape[0], KL_ROWS):
            q = torch.log_softmax(logits[s:s + KL_ROWS].float(), dim=-1)
            ref = self.logp[i][s:s + KL_ROWS].float()
            kl += ((ref.exp() * (ref - q)).sum(-1).double() - self.bias[i][s:s + KL_ROWS]).tolist()
        return kl

    def score(self, i: int, logits) -> tuple[list[float], list[float], list[bool]]:
        """(NLL, KL(P_ref || P), top-1 agreement) at window i's scored positions."""
        import torch

        nll = []
        for s in range(0, logits.shape[0], KL_ROWS):
            q = torch.log_softmax(logits[s:s + KL_ROWS].float(), dim=-1)
            nll += (-q.gather(1, self.targets[i][s:s + KL_ROWS, None])[:, 0]).tolist()
        same = (logits.argmax(-1) == self.top[i]).tolist()
        return nll, self._kl(i, logits), same


def summary(nll: list[float], kl: list[float], same: list[bool]) -> dict:
    """Perplexity with its standard error as wren.perplexity computes it, mean KL (and its standard
    error), top-1 agreement."""
    n = len(nll)
    mean = sum(nll) / n
    var = sum((x - mean) ** 2 for x in nll) / max(1, n - 1)
    ppl = math.exp(mean)
    kl_mean = sum(kl) / n
    kl_var = sum((x - kl_mean) ** 2 for x in kl) / max(1, n - 1)
    return {"perplexity": ppl, "ppl_error": ppl * math.sqrt(var / n), "kl": kl_mean,
            "kl_error": math.sqrt(kl_var / n), "top1": sum(same) / n, "tokens": n}


def agree(tokens: list[int], ref: list[int] | None) -> int | None:
    if ref is None:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))


# ---------------------------------------------------------------------------------------------- wren

def wren_logits(model, window: list[int], first: int):
    """Logits at positions first .. len-2 (those that predict a scored token), float32."""
    import torch

    with torch.inference_mode():
        return model(torch.tensor([window]), logits_to_keep=len(window) - first)[0, :-1].float()


def wren_decode(model, prompt: list[int], steps: int, repeat: int) -> tuple[float, list[int]]:
    import torch

    def run(ids: list[int], n: int):
        cache = model.make_cache(batch=1, max_len=len(ids) + n + 8)
        logits = model(torch.tensor([ids]), cache, logits_to_keep=1)
        out, times = [int(logits[0, -1].argmax())], []
        for _ in range(n):
            t0 = time.perf_counter()
            logits = model(torch.tensor([[out[-1]]]), cache, logits_to_keep=1)
            out.append(int(logits[0, -1].argmax()))
            times.append(time.perf_counter() - t0)
        return times, out

    with torch.inference_mode():
        run(prompt[:8], 4)  # warm-up
        runs = [run(prompt, steps) for _ in range(repeat)]
    return max(1 / statistics.median(t) for t, _ in runs), runs[0][1]


def wren_row(spec: dict, args, windows, ref: Reference, params: int, ref_tokens) -> dict:
    import wren
    from wren.quant import folder

    kwargs = {k: v for k, v in spec.items() if k != "name"}
    row = {"name": spec["name"], "engine": "wren", "config": kwargs}
    t0 = time.perf_counter()
    model = wren.load(args.model)
    if kwargs:
        log(f"wren {spec['name']}: quantize_model({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        folder.quantize_model(model, **kwargs)
        row["quantize_s"] = time.perf_counter() - t0
    else:
        model.storage_bits = {}  # the reference is dense fp32 in memory and on disk, whatever the GGUF held
    row["linear_bits"] = folder.linear_bits_per_weight(model)
    with tempfile.TemporaryDirectory(prefix="wren-quant-quality-") as tmp:
        out = folder.save(model, Path(tmp) / "model")
        row["file_bytes"] = folder.file_bytes(out)
        row["weights_bytes"] = (out / "model.safetensors").stat().st_size
    row["file_bits"] = 8 * row["file_bytes"] / params

    scope = _matmul_scope(args.reference_matmul) if kwargs else _nothing()
    nll, kl, same = [], [], []
    with scope:
        for i, w in enumerate(windows):
            logits = wren_logits(model, w, ref.first)
            if not kwargs:
                ref.keep(i, logits)
            a, b, c = ref.score(i, logits)
            nll, kl, same = nll + a, kl + b, same + c
            log(f"wren {spec['name']}: window {i + 1}/{len(windows)}, ppl so far {math.exp(sum(nll) / len(nll)):.4f}")
            del logits
    row |= summary(nll, kl, same)
    prompt = windows[0][:PROMPT_TOKENS]
    row["decode_tps"], row["tokens_out"] = wren_decode(model, prompt, DECODE_TOKENS, args.decode_repeat)
    row["greedy_agree"] = agree(row["tokens_out"], ref_tokens)
    del model
    gc.collect()
    return row


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _matmul_scope(exact: bool):
    if not exact:
        return _nothing()
    from wren.quant import linear

    return linear.reference_path() if hasattr(linear, "reference_path") else _nothing()


# ----------------------------------------------------------------------------------------- llama.cpp

def llama_row(name: str, args, windows, ref: Reference, params: int, ref_tokens, f32: Path) -> dict:
    import numpy as np
    import torch
    from llama_cpp import Llama

    _llama_requant.check_build()
    row = {"name": name, "engine": "llama.cpp"}
    if name == "F32":
        path = f32
    else:
        path, why = _llama_requant.requantized(f32, name, args.threads, log)
        if path is None:
            return row | {"error": why}
    st = _llama_requant.stats(path)
    row |= {"linear_bits": st["linear_bits"], "file_bytes": st["file_bytes"],
            "file_bits": 8 * st["file_bytes"] / params, "linear_types": st["linear_types"],
            "embed_type": st["embed_type"]}
    n_ctx = max(len(windows[0]), PROMPT_TOKENS + DECODE_TOKENS + 8)
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                    n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
                    type_k=args.llama_kv_type, type_v=args.llama_kv_type)
    except Exception as exc:  # a file llama.cpp will not load: say so in the row
        return row | {"error": f"llama-cpp-python could not load {path.name}: {exc}"}
    try:
        nll, kl, same = [], [], []
        for i, w in enumerate(windows):
            llm.reset()
            llm.eval(w)
            logits = torch.from_numpy(np.array(llm.scores[ref.first:len(w) - 1], dtype=np.float32))
            a, b, c = ref.score(i, logits)
            nll, kl, same = nll + a, kl + b, same + c
            log(f"llama.cpp {name}: window {i + 1}/{len(windows)}, ppl so far "
                f"{math.exp(sum(nll) / len(nll)):.4f}")
            del logits
        row |= summary(nll, kl, same)
        prompt = windows[0][:PROMPT_TOKENS]
        row["decode_tps"], row["tokens_out"] = llama_decode(llm, prompt, DECODE_TOKENS, args.decode_repeat)
        row["greedy_agree"] = agree(row["tokens_out"], ref_tokens)
    finally:
        llm.close()
        del llm
        gc.collect()
    return row


def llama_decode(llm, prompt: list[int], steps: int, repeat: int) -> tuple[float, list[int]]:
    def run(ids: list[int], n: int):
        llm.reset()
        llm.eval(ids)
        out, times = [int(llm.scores[llm.n_tokens - 1].argmax())], []
        for _ in range(n):
            t0 = time.perf_counter()
            llm.eval([out[-1]])
            out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            times.append(time.perf_counter() - t0)
        return times, out

    run(prompt[:8], 4)  # warm-up
    runs = [run(prompt, steps) for _ in range(repeat)]
    return max(1 / statistics.median(t) for t, _ in runs), runs[0][1]


# --------------------------------------------------------------------------------------------- table

def fmt_row(r: dict, ref_ppl: float) -> list[str]:
    name = f"{r['engine']} {r['name']}"
    if "error" in r:
        return [name, "", "", "", "failed: " + r["error"], "", "", "", ""]
    return [name, f"{r['linear_bits']:.3f}", f"{r['file_bits']:.3f}", f"{r['file_bytes'] / 1e6:.1f}",
            f"{r['perplexity']:.4f} ± {r['ppl_error']:.4f}", f"{r['perplexity'] / ref_ppl:.4f}",
            f"{r['kl']:.5f}", f"{100 * r['top1']:.2f}", f"{r['decode_tps']:.1f}"]


HEADER = ["row", "linear bits/w", "file bits/w", "file MB", "PPL ± err", "PPL / ref", "mean KL", "top-1 %",
          "decode tok/s"]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["--:"] * (len(HEADER) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pick(args) -> tuple[list[dict], list[str]]:
    """The rows to run. wren's fp32 reference always runs, and llama.cpp's F32 check with any llama.cpp row."""
    wren_rows = [] if args.only == "llama" else WREN_ROWS[1:]
    llama_rows = [] if args.only == "wren" else LLAMA_ROWS
    if args.configs:
        want = {c.strip().lower() for c in args.configs.split(",") if c.strip()}
        known = {r["name"].lower() for r in WREN_ROWS} | {n.lower() for n in LLAMA_ROWS}
        if unknown := sorted(want - known):
            sys.exit(f"unknown config(s) {', '.join(unknown)}: choose from "
                     f"{', '.join(r['name'] for r in WREN_ROWS)}, {', '.join(LLAMA_ROWS)}")
        wren_rows = [r for r in wren_rows if r["name"].lower() in want]
        llama_rows = [n for n in llama_rows if n.lower() in want]
    llama_rows = ["F32", *(n for n in llama_rows if n != "F32")] if llama_rows else []
    return [WREN_ROWS[0], *wren_rows], llama_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=str(REPO.parent / "shared" / "data" / "prideprejudice.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--only", choices=["wren", "llama"])
    ap.add_argument("--configs", help="comma-separated row names, e.g. tq4,Q4_K_M (fp32 and F32 always run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: wren's default model)")
    ap.add_argument("--reference-matmul", action="store_true",
                    help="score wren's quantized rows with the exact float32 matmul instead of the CPU fast path")
    ap.add_argument("--llama-kv-type", type=int, default=0,
                    help="llama.cpp KV cache ggml type for the scored windows (0 = F32 like wren's cache, 1 = F16)")
    ap.add_argument("--decode-repeat", type=int, default=3, help="timed decode runs per row; the fastest is shown")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    command = "python bench/quant_quality.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    started = time.perf_counter()

    import torch

    from wren.perplexity import windows as make_windows
    from wren.tokenizer import Tokenizer
    from wren.weights.gguf import GGUFFile, tokenizer_metadata
    from wren.weights.load import DEFAULT_MODEL, resolve

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.model = resolve(args.model or DEFAULT_MODEL)
    if args.model.is_dir() or args.model.suffix != ".gguf":
        sys.exit("--model must be a GGUF file: the llama.cpp rows are requantized from it")
    wren_rows, llama_rows = pick(args)
    llama_version = None
    if llama_rows:
        try:
            import llama_cpp
            llama_version = llama_cpp.__version__
        except ImportError:
            llama_rows = []
            log("llama-cpp-python is absent: only wren's rows are measured")

    params = sum(math.prod(t.shape) for t in GGUFFile(args.model).tensors.values())
    tok = Tokenizer.from_gguf_metadata(tokenizer_metadata(GGUFFile(args.model)))
    text = Path(args.file).read_text(encoding="utf-8")
    windows = make_windows(tok.encode(text), args.ctx, args.chunks, tok.bos_id)
    ctx = len(windows[0])
    first = ctx // 2
    ref = Reference(windows, first)
    log(f"{len(windows)} windows of {ctx} tokens, {len(windows) * (ctx - first - 1)} scored; "
        f"{params:,} parameters in {args.model.name}")
    load_before = os.getloadavg()[0]

    rows = []
    ref_tokens = None
    for spec in wren_rows:
        try:
            rows.append(wren_row(spec, args, windows, ref, params, ref_tokens))
        except Exception as exc:
            if spec is wren_rows[0]:
                raise
            log(f"wren {spec['name']} failed: {exc!r}")
            rows.append({"name": spec["name"], "engine": "wren", "error": f"{type(exc).__name__}: {exc}"})
        if ref_tokens is None:
            ref_tokens = rows[0]["tokens_out"]
    if llama_rows:
        f32 = _llama_requant.f32_gguf(args.model, log)
        for name in llama_rows:
            try:
                rows.append(llama_row(name, args, windows, ref, params, ref_tokens, f32))
            except Exception as exc:
                log(f"llama.cpp {name} failed: {exc!r}")
                rows.append({"name": name, "engine": "llama.cpp", "error": f"{type(exc).__name__}: {exc}"})

    ref_row = rows[0]
    notes = []
    check = None
    f32_row = next((r for r in rows if r["engine"] == "llama.cpp" and r["name"] == "F32" and "error" not in r), None)
    if f32_row:
        rel = f32_row["perplexity"] / ref_row["perplexity"] - 1
        check = {"wren_fp32": ref_row["perplexity"], "llama_f32": f32_row["perplexity"], "relative": rel,
                 "kl": f32_row["kl"], "top1": f32_row["top1"], "ok": abs(rel) < CHECK_TOLERANCE}
    load_after = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1) or load_after - load_before > args.threads:
        notes.append(f"1-minute load average was {load_before:.1f} before and {load_after:.1f} after on "
                     f"{os.cpu_count()} CPUs: other processes shared them, so the tok/s are noisy")
    machine = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
               "torch": torch.__version__, "llama_cpp": llama_version, "threads": args.threads,
               "model": str(args.model), "file": args.file, "ctx": ctx, "chunks": len(windows),
               "scored_tokens": ref_row["tokens"], "params": params, "llama_kv_type": args.llama_kv_type,
               "reference_matmul": args.reference_matmul, "runtime_s": time.perf_counter() - started,
               "loadavg_before": load_before, "loadavg_after": load_after}
    if args.json:
        print(json.dumps({"command": command, "machine": machine, "check": check, "notes": notes,
                          "rows": [{k: v for k, v in r.items() if k != "tokens_out"} for r in rows]}))
        return

    print(f"`{command}`\n")
    print(markdown([fmt_row(r, ref_row["perplexity"]) for r in rows]))
    print()
    print(f"{args.model.name} ({params:,} parameters) dequantized to fp32 is the reference; "
          f"{Path(args.file).name}, {len(windows)} windows of {ctx} tokens, {ref_row['tokens']} tokens scored "
          f"(BOS first, second half of each window). KL = mean KL(P_ref || P_row) over the full vocabulary; "
          f"top-1 = how often the argmaxes agree. File bits/w = 8 x file bytes / {params:,}; wren's files are "
          f"its saved folder (model.safetensors, config, tokenizer.json), llama.cpp's the GGUF. "
          f"Decode: {PROMPT_TOKENS}-token prompt, {DECODE_TOKENS} greedy tokens, {args.threads} threads, "
          f"1 / median step, best of {args.decode_repeat} runs; "
          f"runtime {machine['runtime_s'] / 60:.1f} min.")
    print()
    print("The 270M's weights were dequantized from Q4_K/Q5_0/Q6_K/Q8_0 (its GGUF is Q4_K_M), so requantizing "
          "to those grids is nearly lossless and flatters llama.cpp's on-grid types (Q4_K_M rebuilds the "
          "source file). Most of its linear layers are 640 wide, which the 256-wide K-quant blocks do not "
          "divide: llama.cpp stores those with a fallback type (Q5_0, Q5_1, IQ4_NL, Q8_0...), hence linear "
          "bits/w above the type's nominal rate.")
    extra = [r["file_bytes"] - r["weights_bytes"] for r in rows if "weights_bytes" in r]
    if extra:
        print(f"\nwren's folders hold {max(extra) / 1e6:.1f} MB besides model.safetensors (tokenizer.json above all, "
              f"{8 * max(extra) / params:.2f} bits/w of the file column); a GGUF keeps its vocabulary in a few MB of "
              "metadata.")
    if check:
        verdict = "ok" if check["ok"] else "MISMATCH"
        print(f"\ncheck: llama.cpp on the F32 GGUF gives PPL {check['llama_f32']:.4f}, wren's fp32 reference "
              f"{check['wren_fp32']:.4f} ({100 * check['relative']:+.3f}%, within {100 * CHECK_TOLERANCE:g}%: "
              f"{verdict}); their mean KL {check['kl']:.2e} and top-1 {100 * check['top1']:.2f}% are the "
              "floor two engines reach on identical weights.")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
