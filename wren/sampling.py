"""Sampling options (Ollama's names and defaults) and the sampler they build.

The chain follows llama.cpp's: penalties -> top_k -> top_p -> min_p -> temperature -> draw.
Temperature 0 is greedy: an exact argmax of the raw logits.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import native
from .errors import BadOptionError


@dataclass
class Options:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    num_predict: int = -1  # -1: until the turn ends or the context is full
    num_ctx: int = 4096
    kv_cache: str | None = None  # a KV cache type for this request (wren.kv); None: the model's / server's

    @classmethod
    def from_dict(cls, d: dict | None) -> "Options":
        """Options from a mapping; unknown names and wrong types are a BadOptionError."""
        opts = cls()
        for key, value in (d or {}).items():
            if value is None:
                continue
            if key not in {f.name for f in dataclasses.fields(cls)}:
                raise BadOptionError(f"unknown option {key!r}")
            setattr(opts, key, _coerce(key, value, getattr(cls(), key)))
        opts.validate()
        return opts

    def validate(self) -> None:
        checks = [("temperature", self.temperature >= 0), ("top_k", self.top_k >= 0),
                  ("top_p", 0 < self.top_p <= 1), ("min_p", 0 <= self.min_p <= 1),
                  ("repeat_penalty", self.repeat_penalty > 0), ("repeat_last_n", self.repeat_last_n >= -1),
                  ("num_predict", self.num_predict >= -2), ("num_ctx", self.num_ctx >= 1)]
        for name, ok in checks:
            if not ok:
                raise BadOptionError(f"option {name}={getattr(self, name)!r} is out of range")


def _coerce(key: str, value, default):
    if key == "kv_cache":
        from .kv.types import kv_cache_types

        kv_cache_types(value)  # a BadOptionError naming the known types
        return value
    if key == "stop":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise BadOptionError("option 'stop' must be a string or a list of strings")
        return value
    want = int if key in ("top_k", "repeat_last_n", "seed", "num_predict", "num_ctx") else float
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadOptionError(f"option {key!r} must be a number, got {value!r}")
    try:
        number = float(value)
        if want is int and number != int(number):
            raise ValueError
        return want(number)
    except (ValueError, OverflowError):
        raise BadOptionError(f"option {key!r} must be {want.__name__}, got {value!r}") from None


def recent_counts(history: list[int], opts: Options) -> Counter | None:
    """How often each token came among the last repeat_last_n (-1: all) of history, or None where the
    penalties change nothing."""
    n = len(history) if opts.repeat_last_n == -1 else opts.repeat_last_n
    recent = history[-n:] if n > 0 else []
    if not recent or (opts.repeat_penalty == 1 and not opts.presence_penalty and not opts.frequency_penalty):
        return None
    return Counter(recent)  # (a few dozen ids: torch.unique took longer)


def penalties(logits: torch.Tensor, history: list[int], opts: Options) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids, their logits after the repeat, presence and frequency penalties) of the tokens among the last
    repeat_last_n (-1: all) of history, or None where the penalties change nothing."""
    counts = recent_counts(history, opts)
    if counts is None:
        return None
    ids = torch.tensor(list(counts), device=logits.device)
    picked = logits[ids]
    picked = torch.where(picked > 0, picked / opts.repeat_penalty, picked * opts.repeat_penalty)
    times = torch.tensor(list(counts.values()), dtype=picked.dtype, device=logits.device)
    return ids, picked - times * opts.frequency_penalty - opts.presence_penalty


def apply_penalties(logits: torch.Tensor, history: list[int], opts: Options) -> torch.Tensor:
    """The logits with the penalties applied (a copy; the logits themselves where they change nothing)."""
    found = penalties(logits, history, opts)
    return logits if found is None else _with(logits, found)


def _with(logits: torch.Tensor, found: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, picked = found
    logits = logits.clone()
    logits[ids] = picked
    return logits


def filter_logits(logits: torch.Tensor, opts: Options) -> torch.Tensor:
    """Mask (to -inf) every token that top_k, top_p or min_p rules out. logits: [V]."""
    kept, ids = candidates(logits, opts)
    if ids is None:
        return kept
    return torch.full_like(logits, float("-inf"), dtype=torch.float32).index_put_((ids,), kept)


def candidates(logits: torch.Tensor, opts: Options,
               penalized: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the float logits of the tokens that top_k, top_p and min_p keep, their ids; None: every token, with
    the ruled-out ones at -inf). The sampler works on these few: sorting and drawing from all 262k logits
    of a Gemma vocabulary took 14 ms a token, about as long as the decode step that made them.
    `penalized` (`penalties`' ids and values) stands in for those ids' logits."""
    if penalized is not None and not 0 < opts.top_k < logits.numel():
        logits, penalized = _with(logits, penalized), None  # (top_p or min_p alone look at every logit)
    logits, ids = logits.float(), None
    if opts.top_k and opts.top_k < logits.numel():
        if penalized is None:
            logits, ids = top_k(logits, opts.top_k)  # sorted, largest first
        else:
            logits, ids = _top_k_penalized(logits, opts.top_k, penalized)
    if opts.top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        if ids is None:
            probs, ids = _most_probable(probs, opts.top_p)
            logits = logits[ids]
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
        keep = probs.cumsum(-1) - probs < opts.top_p
        logits, ids = logits[keep], ids[keep]
    if opts.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < opts.min_p * probs.max(), float("-inf"))
    return logits, ids


def top_k(x: torch.Tensor, k: int, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) of a vector (the same values; among equal values maybe other ids), searching only the
    blocks that can hold the k largest: they lie in the k blocks of `block` entries with the largest maxima
    (k blocks hold k values at least the k-th largest maximum). For 40 of 262k on a CPU: compiled
    (native.top_k) 0.13 ms, these PyTorch ops 0.23 ms, torch.topk 0.73 ms."""
    n = x.numel()
    found = native.top_k(x, k) if n >= 16 * block else None
    if found is not None:
        return found
    if x.device.type != "cpu" or n // block < 4 * k:
        return torch.topk(x, k)
    whole = n - n % block
    rows = x[:whole].reshape(-1, block)
    blocks = torch.topk(rows.amax(1), k).indices
    values, ids = rows[blocks].reshape(-1), (blocks[:, None] * block + torch.arange(block)).reshape(-1)
    if whole < n:  # the last, short block always takes part
        values, ids = torch.cat((values, x[whole:])), torch.cat((ids, torch.arange(whole, n)))
    values, picked = torch.topk(values, k)
    return values, ids[picked]


def _top_k_penalized(logits: torch.Tensor, k: int, penalized: tuple[torch.Tensor, torch.Tensor]):
    """top_k of the logits with the penalized ids' values replaced, without copying all of them (a 1 MB copy
    a token): the k largest of the others lie among the k + len(ids) largest logits, so those, less the
    penalized ids, with the penalized values, hold the k largest."""
    ids, picked = penalized
    values, found = top_k(logits, min(k + ids.numel(), logits.numel()))
    others = ~torch.isin(found, ids)
    values, found = torch.cat((values[others], picked.float())), torch.cat((found[others], ids))
    values, order = torch.topk(values, min(k, values.numel()))
    return values, found[order]


def _greedy_penalized(logits: torch.Tensor, penalized: tuple[torch.Tensor, torch.Tensor]) -> int:
    """greedy of the logits with the penalized ids' values replaced, without copying all of them."""
    ids, picked = penalized
    best = greedy(logits)
    if best in set(ids.tolist()):  # the top logit was penalized: what comes after it is unknown here
        return greedy(_with(logits, penalized))
    top = picked.max()
    if top < logits[best]:
        return best
    first = int(ids[picked == top].min())  # the first of equals, as greedy
    return first if top > logits[best] else min(first, best)


def _most_probable(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest probabilities, sorted, and their ids: enough of them to reach `mass` (or all), found
    by widening top-k rather than sorting the whole vocabulary."""
    k = 64
    while True:
        top, ids = top_k(probs, min(k, probs.numel()))
        if top.numel() == probs.numel() or float(top.cumsum(-1)[-1]) >= mass:
            return top, ids
        k *= 8


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
         u: torch.Tensor | None = None) -> int:
    """An index drawn from softmax(logits / temperature): one uniform number (u, else the generator's next)
    against the cumulative sum (torch.multinomial over 262k entries took 5 ms). Entries at -inf are never
    drawn."""
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
    u = uniform(generator) if u is None else u
    return min(int(torch.searchsorted(cdf, u.to(cdf.dtype) * cdf[-1], right=True)), cdf.numel() - 1)


def uniform(generator: torch.Generator | None) -> torch.Tensor:
    """The next number in [0, 1) of a sampler's stream: one a drawn token."""
    return torch.rand((), generator=generator, dtype=torch.float32)


def greedy(logits: torch.Tensor, block: int = 256) -> int:
    """The index of the largest logit (the first of equals), as torch.argmax. On a CPU the first block of
    `block` logits whose maximum is the largest is found from the blocks' maxima, then the index in it:
    0.08 ms on a 262k vector, where torch.max(dim) took 0.43 and argmax 0.8 (they keep an index for every
    element they compare)."""
    x = logits.reshape(-1)
    n = x.numel()
    if x.device.type != "cpu" or n < 16 * block:
        return int(torch.max(x, 0).indices)
    whole = n - n % block
    maxima = x[:whole].reshape(-1, block).amax(1)
    first = int(torch.argmax(maxima))  # the first of equal maxima, so the first of equal logits
    if whole < n and bool(x[whole:].max() > maxima[first]):  # the short last block: only if strictly larger
        return whole + int(torch.argmax(x[whole:]))
    return first * block + int(torch.argmax(x[first * block:(first + 1) * block]))


class Sampler:
    """(logits [V], history) -> the next token id, seeded when opts.seed is set. `sample_rows` draws for several
    samplers at once."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.generator = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        return sample_rows([self], logits[None], [history])[0]

    def compiled(self, vocab: int) -> bool:
        """Whether the compiled chain (native.sample_rows) picks this sampler's tokens: greedy, or a top_k its
        heap holds (Ollama's defaults); the rest (top_k 0: top_p or min_p over every logit) run `chain`."""
        o = self.opts
        return o.temperature == 0 or 0 < o.top_k < min(vocab, native.TOP_K_MAX + 1)

    def chain(self, logits: torch.Tensor, history: list[int], u: torch.Tensor | None = None) -> int:
        """The token, in PyTorch ops (u: the uniform number already taken from the stream for it, if any)."""
        opts = self.opts
        penalized = penalties(logits, history, opts)  # the few values they change, not a copy of all
        if opts.temperature == 0:
            return greedy(logits) if penalized is None else _greedy_penalized(logits, penalized)
        kept, ids = candidates(logits, opts, penalized)
        pick = draw(kept.cpu(), opts.temperature, self.generator, u)  # the generator is the CPU's
        return pick if ids is None else int(ids[pick])


def make_sampler(opts: Options) -> Sampler:
    return Sampler(opts)


def sample_rows(samplers: list[Sampler], logits: torch.Tensor, histories: list[list[int]],
                errors: bool = False) -> list:
    """The next token of each row of logits [R, V]: samplers[r](logits[r], histories[r]). The rows the compiled
    chain takes (Sampler.compiled) go through it in one call, rows in parallel; a row's stream gives one uniform
    number a token either way, so a seeded row draws the same tokens alone or beside others. `errors`: a row
    whose own chain raises gets the exception in its place (the others keep their tokens), else it is raised."""
    vocab = logits.shape[-1]
    counts = {r: recent_counts(h, s.opts) for r, (s, h) in enumerate(zip(samplers, histories)) if s.compiled(vocab)}
    rows = [r for r, c in counts.items() if not c or (min(c) >= 0 and max(c) < vocab)]  # (else the chain's error)
    us = {r: uniform(samplers[r].generator) for r in counts if samplers[r].opts.temperature > 0}
    tokens = native.sample_rows(logits, rows, [samplers[r].opts for r in rows], [us.get(r, 0.0) for r in rows],
                                [counts[r] for r in rows]) if rows else None
    picked = dict(zip(rows, tokens)) if tokens is not None else {}
    out = []
    for r, s in enumerate(samplers):
        try:
            out.append(picked[r] if picked.get(r, -1) >= 0 else s.chain(logits[r], histories[r], us.get(r)))
        except Exception as exc:  # noqa: BLE001 -- handed to the caller for that row alone
            if not errors:
                raise
            out.append(exc)
    return out
