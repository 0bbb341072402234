"""Token generation: chunked prefill, decode, stop conditions, batches; and the text stream built on it.

The engine never sees text: `Generation` maps prompt ids to new ids. `stream_text` adds the chat template,
the streaming detokenizer and stop strings for callers that speak text (the CLI, the server).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import chat
from .graphs import decode_step
from .errors import BadOptionError, ContextLengthError
from .kv import make_kv_cache, resolve_types
from .sampling import Options, make_sampler, sample_rows
from .tokenizer import StreamDetokenizer

PREFILL_CHUNK = 512


@dataclass
class Stats:
    """Ollama-style counters, durations in seconds."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    done_reason: str = ""
    timings: dict = field(default_factory=dict)

    @property
    def prompt_rate(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def eval_rate(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


def context_length(model, opts: Options) -> int:
    return max(1, min(opts.num_ctx, model.config.max_position_embeddings))


class Generation:
    """Iterate to get, per step, one new token id per sequence (None once that sequence has stopped)."""

    def __init__(self, model, prompts: list[list[int]], opts: Options, stop_ids: set[int],
                 prefill_chunk: int = PREFILL_CHUNK, kv_cache: str | None = None):
        if not prompts or any(not p for p in prompts):
            raise BadOptionError("every prompt needs at least one token")
        self.model, self.opts, self.stop_ids = model, opts, set(stop_ids)
        self.prompts = [list(p) for p in prompts]
        self.ctx = context_length(model, opts)
        longest = max(len(p) for p in prompts)
        if longest >= self.ctx:
            raise ContextLengthError(f"the prompt has {longest} tokens but the context holds {self.ctx}; "
                                     "shorten it or raise num_ctx")
        self.prefill_chunk = prefill_chunk
        # The cache type: this call's, else the stored model's PARAMETER kv_cache, else $WREN_KV_CACHE.
        self.kv_types = resolve_types(model, kv_cache if kv_cache is not None else getattr(model, "kv_cache", None))
        self.stats = Stats(prompt_tokens=sum(len(p) for p in prompts))
        seeds = [None if opts.seed is None else opts.seed + i for i in range(len(prompts))]
        self.samplers = [make_sampler(Options(**{**opts.__dict__, "seed": s})) for s in seeds]

    def _prefill(self, cache) -> torch.Tensor:
        longest = max(len(p) for p in self.prompts)
        pad = self.model.config.pad_token_id or 0
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in self.prompts], device=cache.valid.device)
        for row, p in enumerate(self.prompts):
            cache.valid[row, : longest - len(p)] = False  # left padding is never attended to
        logits = None
        for start in range(0, longest, self.prefill_chunk):
            logits = self.model(ids[:, start:start + self.prefill_chunk], cache, logits_to_keep=1)
        return logits[:, -1]

    def __iter__(self):
        model, opts = self.model, self.opts
        batch = len(self.prompts)
        histories = [list(p) for p in self.prompts]
        alive = [True] * batch
        limit = opts.num_predict if opts.num_predict >= 0 else None
        with torch.inference_mode():
            cache = make_kv_cache(model, batch=batch, max_len=self.ctx, spec=self.kv_types)
            t0 = time.perf_counter()
            logits = self._prefill(cache)
            self.stats.prompt_seconds = time.perf_counter() - t0
            step_model = decode_step(model, cache)  # on a GPU, the step captured in a CUDA graph
            t0 = time.perf_counter()
            steps = 0
            while True:
                if limit is not None and steps >= limit:
                    self.stats.done_reason = "length"
                    break
                step = []
                live = [row for row in range(batch) if alive[row]]
                drawn = dict(zip(live, sample_rows([self.samplers[r] for r in live], logits[live],
                                                   [histories[r] for r in live])))
                for row in range(batch):
                    if not alive[row]:
                        step.append(None)
                        continue
                    token = drawn[row]
                    if token in self.stop_ids:
                        alive[row] = False
                        step.append(None)
                        continue
                    histories[row].append(token)
                    step.append(token)
                steps += 1
                if not any(alive):
                    self.stats.done_reason = "stop"
                    break
                self.stats.generated_tokens += sum(t is not None for t in step)
                self.stats.generate_seconds = time.perf_counter() - t0
                yield step
                if cache.length >= self.ctx:
                    self.stats.done_reason = "length"
                    break
                logits = step_model(torch.tensor([[t if t is not None else 0] for t in step]))
            self.stats.generate_seconds = time.perf_counter() - t0


class StopStrings:
    """Holds back text that might be the start of a stop string; reports when one appears."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def prompt_ids(model, prompt, *, system: str | None = None, raw: bool = False, think: bool = False) -> list[int]:
    """Token ids for a prompt string or a list of chat messages, through the model's chat template."""
    tok = model.tokenizer
    if raw:
        if not isinstance(prompt, str):
            raise BadOptionError("a raw prompt must be a string")
        return tok.encode(prompt, add_bos=True)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    template = model.chat_template or chat.template_for(model)
    ids, _ = chat.render(messages, tok, template, think=think)
    return ids


def stream_text(model, prompt, opts: Options, *, system: str | None = None, raw: bool = False,
                think: bool = False, stats_out: list | None = None, kv_cache: str | None = None):
    """Yield text pieces of the model's reply. The Stats object is appended to `stats_out` at the end."""
    ids = prompt_ids(model, prompt, system=system, raw=raw, think=think)
    stops = chat.stop_ids(model.tokenizer, chat.template_for(model))
    gen = Generation(model, [ids], opts, stops, kv_cache=kv_cache)
    detok = StreamDetokenizer(model.tokenizer)
    stop_strings = StopStrings(opts.stop)
    try:
        for (token,) in gen:
            text, hit = stop_strings.push(detok.push(token))
            if text:
                yield text
            if hit:
                gen.stats.done_reason = "stop"
                return
        tail, _ = stop_strings.push(detok.flush())
        tail += stop_strings.flush()
        if tail:
            yield tail
    finally:
        if stats_out is not None:
            stats_out.append(gen.stats)
