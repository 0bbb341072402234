"""Sampling options (Ollama's names and defaults) and the sampler they build.

The chain follows llama.cpp's: penalties -> top_k -> top_p -> min_p -> temperature -> draw.
Temperature 0 is greedy: an exact argmax of the raw logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

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


def apply_penalties(logits: torch.Tensor, history: list[int], opts: Options) -> torch.Tensor:
    """Repeat, presence and frequency penalties over the last repeat_last_n tokens (-1: all)."""
    n = len(history) if opts.repeat_last_n == -1 else opts.repeat_last_n
    recent = history[-n:] if n > 0 else []
    if not recent or (opts.repeat_penalty == 1 and not opts.presence_penalty and not opts.frequency_penalty):
        return logits
    ids, counts = torch.tensor(recent, device=logits.device).unique(return_counts=True)
    picked = logits[ids]
    picked = torch.where(picked > 0, picked / opts.repeat_penalty, picked * opts.repeat_penalty)
    picked = picked - counts.to(picked.dtype) * opts.frequency_penalty - opts.presence_penalty
    logits = logits.clone()
    logits[ids] = picked
    return logits


def filter_logits(logits: torch.Tensor, opts: Options) -> torch.Tensor:
    """Mask (to -inf) every token that top_k, top_p or min_p rules out. logits: [V]."""
    logits = logits.float()
    if opts.top_k and opts.top_k < logits.numel():
        kth = torch.topk(logits, opts.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
        drop = probs.cumsum(-1) - probs >= opts.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if opts.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < opts.min_p * probs.max(), float("-inf"))
    return logits


def make_sampler(opts: Options):
    """A closure (logits [V], history) -> next token id, seeded when opts.seed is set."""
    generator = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None

    def sample(logits: torch.Tensor, history: list[int]) -> int:
        logits = apply_penalties(logits, history, opts)
        if opts.temperature == 0:
            return int(torch.argmax(logits))
        logits = filter_logits(logits, opts) / opts.temperature
        probs = torch.softmax(logits, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=generator))

    return sample
