"""One choreography for the server's per-row caches (dense SlotCache and the compressed one): rows prefilled
separately, decoded together at different lengths past the sliding window, then a row truncated and reused."""

from __future__ import annotations

import torch

SEQUENCE_LENGTHS = {0: 17, 2: 5, 3: 30}  # row -> tokens
PREFILL = {0: 10, 2: 3, 3: 20}  # row -> tokens prefilled before the rows decode together


def random_sequences(seed: int, vocab: int = 384) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {r: torch.randint(0, vocab, (n,), generator=g).tolist() for r, n in SEQUENCE_LENGTHS.items()}


def drive(model, cache, seqs: dict[int, list[int]]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({row: logits [T, V] at every position}, the logits of row 3's last token after truncating it to 29)."""
    out = {r: [] for r in seqs}
    for r, n in PREFILL.items():
        cache.select([r])
        out[r] += list(model(torch.tensor([seqs[r][:n]]), cache)[0])
    while rows := [r for r in seqs if cache.lengths[r] < len(seqs[r])]:
        cache.select(rows)
        logits = model(torch.tensor([[seqs[r][cache.lengths[r]]] for r in rows]), cache)
        for i, r in enumerate(rows):
            out[r].append(logits[i, 0])
    cache.truncate(3, 29)  # reuse all but the last position
    cache.select([3])
    again = model(torch.tensor([[seqs[3][29]]]), cache)[0, 0]
    return {r: torch.stack(v) for r, v in out.items()}, again
