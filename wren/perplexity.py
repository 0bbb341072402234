"""Perplexity the way llama.cpp's perplexity tool measures it, so the numbers compare.

The text is tokenized once and cut into windows of `ctx` tokens; each window starts with BOS in place of its
first token, and only the second half of each window is scored (every scored token sees at least ctx/2
tokens of context). The estimate is exp(mean NLL), with the standard error of the mean carried through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BadOptionError
from .kv import kv_bytes_per_token, make_kv_cache, resolve_types, spec_name
from .kv.types import model_dtype_name


@dataclass
class PerplexityResult:
    perplexity: float
    error: float  # one standard error
    tokens: int  # scored tokens
    ctx: int
    chunks: int
    nll: list[float]
    kv_cache: str = ""  # the cache type the windows ran through (wren.kv), e.g. "f32" or "tq4/tq3"
    kv_bytes_per_token: int = 0

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "error": self.error, "tokens": self.tokens, "ctx": self.ctx,
                "chunks": self.chunks, "kv_cache": self.kv_cache, "kv_bytes_per_token": self.kv_bytes_per_token}


def windows(ids: list[int], ctx: int, chunks: int | None, bos: int | None) -> list[list[int]]:
    if ctx < 16:
        raise BadOptionError(f"--ctx {ctx} is too small; use at least 16")
    available = len(ids) // ctx
    if available == 0:
        raise BadOptionError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}; "
                             "give a longer file or a smaller --ctx")
    n = available if not chunks else min(chunks, available)
    out = []
    for i in range(n):
        w = ids[i * ctx:(i + 1) * ctx]
        if bos is not None:
            w = [bos] + w[1:]
        out.append(w)
    return out


def window_nll(model, tokens: list[int], first_scored: int, kv_types=None) -> torch.Tensor:
    """-log p(token[i+1] | tokens[..i]) for i >= first_scored, in fp32. With `kv_types` other than the
    dense default, the window runs through that cache, so every query attends to compressed keys/values."""
    with torch.inference_mode():
        device = model.norm.weight.device
        cache = None
        if kv_types is not None and kv_types != (model_dtype_name(model),) * 2:
            cache = make_kv_cache(model, batch=1, max_len=len(tokens), spec=kv_types)
        logits = model(torch.tensor([tokens], device=device), cache)[0, first_scored:-1].float()
        target = torch.tensor(tokens[first_scored + 1:], device=device)
        return -torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0].cpu()


def perplexity(model, ids: list[int], ctx: int = 512, chunks: int | None = None, progress=None,
               kv_cache: str | None = None) -> PerplexityResult:
    """`kv_cache`: a cache type spec (wren.kv); None takes the model's stored PARAMETER, then $WREN_KV_CACHE."""
    ctx = min(ctx, model.config.max_position_embeddings)
    kv_types = resolve_types(model, kv_cache if kv_cache is not None else getattr(model, "kv_cache", None))
    bos = model.tokenizer.bos_id if model.tokenizer is not None else None
    parts = windows(ids, ctx, chunks, bos)
    nll: list[float] = []
    for i, w in enumerate(parts):
        nll += window_nll(model, w, ctx // 2, kv_types).tolist()  # llama.cpp: logits from ctx/2 on
        if progress is not None:
            progress(i + 1, len(parts), math.exp(sum(nll) / len(nll)))
    mean = sum(nll) / len(nll)
    var = sum((x - mean) ** 2 for x in nll) / max(1, len(nll) - 1)
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * math.sqrt(var / len(nll)), len(nll), ctx, len(parts), nll,
                            spec_name(kv_types), kv_bytes_per_token(model, kv_types))
