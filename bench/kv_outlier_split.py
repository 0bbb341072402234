"""The TurboQuant paper's outlier-channel split for fractional-rate keys, measured against what wren ships.

    python bench/kv_outlier_split.py --ctx 2048,8192     # ~20 min on 2 cores

wren's fractional rates (tq3.5, tq2.5) give one more bit to the first part of the *rotated* coordinates
(turboquant._runs): one rotation, one scale. The paper instead splits the head vector's channels, before
any rotation, into an outlier set and the rest, and codes each set with its own TurboQuant instance
(rotation, bits, scale): here two of wren's own TQ codecs. The split is data-free: RoPE pairs ranked by
|q_j|·|k_j| from the q_norm and k_norm gains (the energy the cached key k·s carries in channel j, and the
weight the query gives it, since the key scales of kv/scales.py make both proportional to it); a random
choice of pairs is the control.
Only keys are split (values stay f16), so the rows isolate the key codec. Each split codec costs 2 bytes
more a vector than the shipped one (a second fp16 scale).

The split codec lives here, not in wren: it was measured and not adopted (docs/kv_cache.md). It replaces the
key codec of each layer of a CompressedKVCache in place; perplexity is scored as bench/kv_quality.py scores
it (one window per context, its second half).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_quality import REPO, prefill  # noqa: E402

ROWS = [  # (label, cache spec, split: (high bits, low bits, ranked or random) or None for the shipped codec)
    ("tq3.5 keys, shipped (rotated split)", "tq3.5/f16", None),
    ("tq3.5 keys, channel split, ranked", "tq3.5/f16", (4, 3, "ranked")),
    ("tq3.5 keys, channel split, random", "tq3.5/f16", (4, 3, "random")),
    ("tq2.5 keys, shipped (rotated split)", "tq2.5/f16", None),
    ("tq2.5 keys, channel split, ranked", "tq2.5/f16", (3, 2, "ranked")),
]


class SplitKeys:
    """Keys coded as two of wren's TQ codecs (kv/codecs.py) over a channel split: `order` lists the high
    set first. Each part gets its own rotation, codebook and fp16 scale."""

    def __init__(self, order: torch.Tensor, n_high: int, high_bits: int, low_bits: int):
        from wren.kv.codecs import TQ

        self.order, self.n_high = order, n_high
        self.codecs = (TQ(f"tq{high_bits}", n_high), TQ(f"tq{low_bits}", order.numel() - n_high))

    def _parts(self, x: torch.Tensor):
        x = x[..., self.order]
        return zip((x[..., :self.n_high], x[..., self.n_high:]), self.codecs)

    def empty(self, prefix: tuple, device) -> tuple:
        return tuple(t for c in self.codecs for t in c.empty(prefix, device))

    def encode(self, x: torch.Tensor) -> tuple:
        return tuple(t for part, c in self._parts(x.float()) for t in c.encode(part))

    def read(self, parts: tuple, dtype, key_scale=None):
        from wren.models.layers import InFrame

        data = torch.cat([self.codecs[0].decode_rotated(parts[:2]), self.codecs[1].decode_rotated(parts[2:])], -1)
        return InFrame(data.to(dtype), SplitFrame(self, key_scale), None)


class SplitFrame:
    def __init__(self, codec: SplitKeys, key_scale):
        self.codec, self.key_scale = codec, key_scale

    def enter(self, q: torch.Tensor) -> torch.Tensor:
        from wren.quant.cpu_kernels import rotate_fast

        q32 = q.float() if self.key_scale is None else q.float() / self.key_scale
        return torch.cat([rotate_fast(p, c.cfg) for p, c in self.codec._parts(q32)], dim=-1).to(q.dtype)


def split_codec(attn, dim: int, high_bits: int, low_bits: int, mode: str, layer: int) -> SplitKeys:
    """Half the RoPE pairs (both channels of a pair together) in the high set: by |q|·|k| or at random."""
    from wren.kv.scales import _rope_pair_rms
    from wren.quant.importance import _gain

    half = dim // 2
    if mode == "ranked":
        weight = _rope_pair_rms(_gain(attn.q_norm)) * _rope_pair_rms(_gain(attn.k_norm))
        pairs = torch.argsort(weight[:half], descending=True)
    else:
        pairs = torch.randperm(half, generator=torch.Generator().manual_seed(layer))
    high, low = pairs[:half // 2], pairs[half // 2:]
    order = torch.cat([high, high + half, low, low + half])
    return SplitKeys(order, 2 * high.numel(), high_bits, low_bits)


def perplexity(model, ids: list[int], spec: str, split) -> float:
    from wren.kv import make_kv_cache

    first = len(ids) // 2
    nll = []
    with torch.inference_mode():
        cache = make_kv_cache(model, batch=1, max_len=len(ids), spec=spec)
        if split is not None:
            for i, (kc, vc) in list(cache.codecs.items()):
                codec = split_codec(model.layers[i].self_attn, kc.dim, *split, layer=i)
                cache.codecs[i] = (codec, vc)
                cache.keys[i] = codec.empty(tuple(cache.keys[i][0].shape[:3]), cache.keys[i][0].device)
        for start, logits in prefill(model, ids, cache, first):
            logp = torch.log_softmax(logits, -1)
            nll += [-float(logp[j, ids[start + j + 1]]) for j in range(logits.shape[0]) if start + j < len(ids) - 1]
    return math.exp(statistics.mean(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", default="2048,8192")
    ap.add_argument("--file", default=str(REPO.parent / "shared" / "data" / "prideprejudice.txt"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import wren
    from wren.perplexity import windows

    torch.set_num_threads(args.threads)
    model = wren.load()
    text_ids = model.tokenizer.encode(Path(args.file).read_text(encoding="utf-8"))
    contexts = [int(c) for c in args.ctx.split(",") if c]
    table = {}
    for ctx in contexts:
        ids = next(iter(windows(text_ids, ctx, 1, model.tokenizer.bos_id)))
        base = perplexity(model, ids, "f16", None)
        for label, spec, split in ROWS:
            table.setdefault(label, {})[ctx] = perplexity(model, ids, spec, split) / base - 1
            print(f"ctx {ctx} {label}: {100 * table[label][ctx]:+.2f}%", file=sys.stderr, flush=True)
    print("| keys (values f16) | " + " | ".join(f"{c} vs f16" for c in contexts) + " |")
    print("|---|" + "--:|" * len(contexts))
    for label, row in table.items():
        print(f"| {label} | " + " | ".join(f"{100 * row[c]:+.2f}%" for c in contexts) + " |")


if __name__ == "__main__":
    main()
