"""How far do `wren run`'s int8 levels (and `--low-memory`'s blocks) take a GGUF from its exact weights, beside
llama.cpp's own kernels?

    python bench/gguf_quality.py                  # the default model, 8 windows of 512 tokens of the book
    python bench/gguf_quality.py --model m.gguf --windows 4 --file text.txt

Rows: `exact` (wren.load: the GGUF dequantized to float32, the reference), `int8` (wren.load(int8=True), what
`wren run` / `wren serve` run: int8 levels and int8 inputs in the compiled kernels), `int8 levels, float
inputs` (the same levels through the float32 reference path: the levels' own share of the error), and
`in place, a token at a time` (wren.load(int8=True, in_place=True), what `--low-memory` runs: the first half of
each window prefilled, the second, which is scored, decoded a forward a token through the kernels that read the
GGUF's blocks), and `llama.cpp` (llama-cpp-python on the same file, 8-bit activations in its dot products).
Each window starts
with BOS; perplexity scores the second half of each window, as llama.cpp's perplexity does; top-1 agreement
counts every position. Printed, never asserted (tests/test_gguf_levels.py asserts loose bounds).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT.parent / "shared" / "data" / "prideprejudice.txt"


def scores(logits: np.ndarray, tokens: list[int], half: int) -> tuple[list[float], np.ndarray]:
    """(-log p(next token) over the second half of the window, the argmax at every position)."""
    logits = torch.from_numpy(np.asarray(logits[: len(tokens) - 1], dtype=np.float32))
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(tokens[1:])
    nll = -logp[torch.arange(len(target)), target]
    return nll[half:].tolist(), logits.argmax(-1).numpy()


def token_at_a_time(model, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [T, V] of x [1, T]: the first `prefill` positions in one forward, the rest a forward each."""
    from wren.cache import KVCache

    cache = KVCache(model.specs, 1, x.shape[1] + 1, model.config.sliding_window)
    logits = [model(x[:, :prefill], cache=cache)[0]]
    logits += [model(x[:, i:i + 1], cache=cache)[0] for i in range(prefill, x.shape[1])]
    return torch.cat(logits)


def main() -> None:
    import wren
    from wren.quant.linear import reference_path
    from wren.weights.load import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: wren's default model)")
    ap.add_argument("--file", type=Path, default=BOOK, help="the text (default ../shared/data/prideprejudice.txt)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    exact, fast = wren.load(path), wren.load(path, int8=True)
    in_place = wren.load(path, int8=True, in_place=True)
    ids = exact.tokenizer.encode(args.file.read_text(encoding="utf-8", errors="replace"))
    step = args.ctx - 1
    if len(ids) < args.windows * step:
        raise SystemExit(f"{args.file} holds {len(ids)} tokens, fewer than {args.windows} windows of {args.ctx}")
    windows = [[exact.tokenizer.bos_id] + ids[i * step:(i + 1) * step] for i in range(args.windows)]
    llm = None
    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), n_ctx=args.ctx, n_batch=args.ctx, n_threads=args.threads,
                    logits_all=True, verbose=False)
    rows = ["exact", "int8", "int8 levels, float inputs", "in place, a token at a time"]
    rows += ["llama.cpp"] if llm else []
    nll = {r: [] for r in rows}
    tops = {r: [] for r in rows}
    for tokens in windows:
        x = torch.tensor([tokens])
        with torch.no_grad():
            out = {"exact": exact(x)[0].numpy(), "int8": fast(x)[0].numpy()}
            with reference_path():
                out["int8 levels, float inputs"] = fast(x)[0].numpy()
            out["in place, a token at a time"] = token_at_a_time(in_place, x, args.ctx // 2).numpy()
        if llm:
            llm.reset()
            llm.eval(tokens)
            out["llama.cpp"] = np.asarray(llm.scores[: len(tokens)])
        for r in rows:
            n, a = scores(out[r], tokens, args.ctx // 2)
            nll[r] += n
            tops[r].append(a)
    ppl = {r: math.exp(float(np.mean(nll[r]))) for r in rows}
    top = {r: np.concatenate(tops[r]) for r in rows}
    print(f"{path.name}: {args.windows} windows of {args.ctx} tokens of {args.file.name}, {args.threads} threads\n")
    header = ["row", "perplexity", "vs exact", "top-1 = exact's"] + (["top-1 = llama.cpp's"] if llm else [])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells = [r, f"{ppl[r]:.4f}", f"{(ppl[r] / ppl['exact'] - 1) * 100:+.2f}%",
                 f"{(top[r] == top['exact']).mean():.4f}"]
        if llm:
            cells.append(f"{(top[r] == top['llama.cpp']).mean():.4f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
