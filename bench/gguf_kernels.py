"""The kernels that multiply a GGUF's blocks in place (`--low-memory`, wren/_gguf_blocks.h), per block type and
number of input rows, beside the int8 levels' kernel (`wren run`) on the same matrix.

    python bench/gguf_kernels.py                                  # every type, 1 / 4 / 16 / 32 / 512 input rows
    python bench/gguf_kernels.py --types Q3_K,Q4_K --rows 1,32 --threads 1

The matrix is one E2B-shaped MLP projection (6144 x 1536) of random blocks (tests/test_gguf_blocks.py). Each
cell is the median of --repeat timed calls, in picoseconds per weight and input row: one input row is decode
(the blocks read once, ~the memory's speed for 4-bit types on these machines), 12 or more take the tiles
(`gguf_tiles`). Times are printed, never asserted; the VM is noisy, so compare columns of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import gguf  # noqa: E402
from test_gguf_blocks import _random_blocks  # noqa: E402

from wren import native  # noqa: E402
from wren.quant.linear import group_config  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def per_weight_row(call, weights: int, rows: int, repeat: int) -> float:
    call()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (weights * rows) * 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--rows", default="1,4,16,32,512")
    ap.add_argument("--out", type=int, default=6144)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    if not native.blocks_readable():
        raise SystemExit("this CPU does not run the GGUF block kernels (AVX-512 VNNI, VL and F16C)")
    torch.set_num_threads(args.threads)
    n, k = args.out, args.width
    types, counts = args.types.split(","), [int(r) for r in args.rows.split(",")]
    weights = {t: native.BlocksWeight(_random_blocks(gguf.GGMLQuantizationType[t], n, k, 0),
                                      int(gguf.GGMLQuantizationType[t]), k) for t in types}
    levels = native.Weight(*native.blocks_to_levels(_random_blocks(gguf.GGMLQuantizationType.Q8_0, n, k, 0),
                                                    int(gguf.GGMLQuantizationType.Q8_0), k, 128, 0), 128)
    table = {}
    for rows in counts:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        blocks_in = native.quantize_blocks(x)
        levels_in = native.quantize_input(x, group_config(8, 128, 0), None)
        repeat = max(3, args.repeat // max(1, rows // 16))
        for t in types:
            table[t, rows] = per_weight_row(lambda: weights[t].matmul(blocks_in), n * k, rows, repeat)
        table["levels", rows] = per_weight_row(lambda: levels.matmul(levels_in), n * k, rows, repeat)
    print(f"ps per weight and input row, {n} x {k}, {args.threads} threads (median of timed calls)\n")
    print("| type | " + " | ".join(f"{r} rows" for r in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for t in [*types, "levels"]:
        name = "int8 levels (wren run)" if t == "levels" else t
        print(f"| {name} | " + " | ".join(f"{table[t, r]:.1f}" for r in counts) + " |")


if __name__ == "__main__":
    main()
