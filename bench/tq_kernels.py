"""TurboQuant matmul kernels against the dense matmul they replace, on the layer shapes of real Gemma models.

    python bench/tq_kernels.py                 # CPU: the int8 fast path and the fp32 reference vs dense bf16/fp32
    python bench/tq_kernels.py --shapes 31b    # on a CUDA machine: the Triton kernel vs cuBLAS bf16

Per shape and batch it prints the time per call, the weight bytes each call reads, and the rate at which
they are read; on CUDA also that rate as a fraction of the measured device-to-device copy bandwidth, which
is the ceiling for a memory-bound GEMV.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wren.quant import cpu_kernels, triton_kernels  # noqa: E402
from wren.quant.linear import TQLinear, reference_path  # noqa: E402

# (name, out, in): the matmuls of one decoder layer and the LM head
SHAPES = {
    "270m": [("qkv", 1536, 640), ("o", 640, 1024), ("gate_up", 4096, 640), ("down", 640, 2048),
             ("head", 262144, 640)],
    "e2b": [("q", 2048, 1536), ("gate_up", 12288, 1536), ("down", 1536, 6144), ("head", 262144, 1536)],
    "31b": [("q", 8192, 5376), ("kv", 8192, 5376), ("o", 5376, 8192), ("gate_up", 43008, 5376),
            ("down", 5376, 21504), ("head", 262144, 5376)],
}


def timed(fn, device: str, min_seconds: float = 0.3) -> float:
    fn()
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=100) / 1e3
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or n < 3:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    seconds = timed(lambda: b.copy_(a), "cuda")
    return 2 * a.numel() / seconds


def rows_for(device: str, shape_set: str):
    for name, out_f, in_f in SHAPES[shape_set]:
        if device == "cpu" and out_f * in_f > 300e6:
            continue
        yield name, out_f, in_f


def time_lookups(layer, xr, copies, device: str) -> dict:
    """The row GEMV alone (x already in its order) with each codebook lookup, the best of its configs:
    {"codebook" | "pairs": (seconds, config)}; what the autotuner chooses between, side by side."""
    xn = triton_kernels.nibble_major(xr)
    words = [(triton_kernels._words(c), s) for c, s in copies]
    turn = iter(range(1 << 62))
    best = {}
    for config in triton_kernels.row_configs():
        def launch():
            triton_kernels._gemv_row(xn, [words[next(turn) % len(words)]], layer.cfg, torch.float32, False, config)

        seconds = timed(launch, device, min_seconds=0.1)
        lookup = "pairs" if config["PAIRS"] else "codebook"
        if lookup not in best or seconds < best[lookup][0]:
            best[lookup] = (seconds, config)
    return best


def bench(device: str, shape_set: str, bits: float, batches: list[int], group: int) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, out_f, in_f in rows_for(device, shape_set):
        w = torch.randn(out_f, in_f, device=device, generator=gen, dtype=torch.float32)
        layer = TQLinear.from_dense(w, bits, group or in_f, seed=0)
        dense_bf16 = w.to(torch.bfloat16)
        code_bytes = layer.codes.numel() + layer.scales.numel() * 2
        for m in batches:
            x = torch.randn(m, in_f, device=device, generator=gen).to(torch.bfloat16)
            row = {"shape": name, "out": out_f, "in": in_f, "batch": m,
                   "dense_bf16_s": timed(lambda: F.linear(x, dense_bf16), device)}
            if device == "cuda":
                row["tq_s"] = timed(lambda: layer(x), device)
                xr = layer.rotate_input(x, fast=True)
                # copies of the codes read in turn, 256 MB in all: a matrix that fits the L2 cache (60 MB on
                # an H200) would otherwise be timed from it
                copies = [(layer.codes.clone(), layer.scales.clone()) for _ in range(-(-(256 << 20) // code_bytes))]
                turn = iter(range(1 << 62))
                row["tq_kernel_only_s"] = timed(
                    lambda: triton_kernels.tq_linear(xr, *copies[next(turn) % len(copies)], layer.cfg), device)
                row["tq_bytes"] = code_bytes
                if m == 1 and bits == 4:
                    row["lookups"] = time_lookups(layer, xr, copies, device)
                del copies
            else:
                layer.int8_levels()
                row["tq_s"] = timed(lambda: layer(x), device)
                xr = layer.rotate_input(x, fast=True)
                row["tq_kernel_only_s"] = timed(lambda: cpu_kernels.int8_matmul(xr, *layer.int8_levels()), device)
                row["tq_bytes"] = layer.int8_levels()[0].numel() + 2 * out_f
                if out_f * in_f < 20e6:
                    with reference_path():
                        row["reference_s"] = timed(lambda: layer(x.float()), device)
            row["dense_bytes"] = dense_bf16.numel() * 2
            rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], device: str, bandwidth: float | None, bits: float) -> None:
    what = "Triton kernel" if device == "cuda" else "int8 fast path"
    print(f"\nTurboQuant {bits:g}-bit {what} vs dense bf16 on {device}"
          + (f" (copy bandwidth {bandwidth / 1e9:.0f} GB/s)" if bandwidth else ""))
    head = "| shape | out × in | batch | dense bf16 µs | TQ µs (with rotation) | TQ kernel µs | TQ GB/s |"
    if bandwidth:
        head += " % of copy bw | speed-up |"
    else:
        head += " fp32 reference µs | speed-up |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        rate = r["tq_bytes"] / r["tq_kernel_only_s"]
        cells = [r["shape"], f"{r['out']}×{r['in']}", r["batch"], f"{r['dense_bf16_s'] * 1e6:.1f}",
                 f"{r['tq_s'] * 1e6:.1f}", f"{r['tq_kernel_only_s'] * 1e6:.1f}", f"{rate / 1e9:.0f}"]
        if bandwidth:
            cells.append(f"{100 * rate / bandwidth:.0f}%")
        else:
            cells.append(f"{r['reference_s'] * 1e6:.0f}" if "reference_s" in r else "-")
        cells.append(f"{r['dense_bf16_s'] / r['tq_s']:.2f}x")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    lookups = [r for r in rows if "lookups" in r]
    if lookups:
        print("\nThe batch-1 row GEMV alone with each codebook lookup (best config of each; the autotuner picks)")
        print("| shape | codebook µs | % of copy bw | config | pairs µs | % of copy bw | config |")
        print("|---|---|---|---|---|---|---|")
        for r in lookups:
            cells = [r["shape"]]
            for lookup in ("codebook", "pairs"):
                seconds, config = r["lookups"][lookup]
                cells += [f"{seconds * 1e6:.1f}", f"{100 * r['tq_bytes'] / seconds / bandwidth:.0f}%",
                          " ".join(f"{k}={v}" for k, v in config.items() if k != "PAIRS")]
            print("| " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help=f"one of {', '.join(SHAPES)} (default: 270m on CPU, all on CUDA)")
    p.add_argument("--bits", type=float, nargs="+", default=[4])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group", type=int, default=128, help="group size (wren quantize's default; 0 = whole rows)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not triton_kernels.available():
        sys.exit("no CUDA device with Triton here; run with --device cpu")
    bandwidth = copy_bandwidth() if args.device == "cuda" else None
    sets = [args.shapes] if args.shapes else (["270m"] if args.device == "cpu" else list(SHAPES))
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, "
          f"threads {args.threads}")
    for bits in args.bits:
        for shape_set in sets:
            print(f"\n## {shape_set}")
            print_table(bench(args.device, shape_set, bits, args.batch, args.group), args.device, bandwidth, bits)


if __name__ == "__main__":
    main()
