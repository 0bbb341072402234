"""The batching worker: one thread per loaded model, continuous batching over the rows of a SlotCache.

Requests (`Job`s) arrive on a thread-safe inbox. Each loop iteration the worker frees the rows of cancelled
jobs, gives free rows to waiting jobs (preferring the row whose finished sequence shares the longest prefix
with the new prompt, so a chat's next turn only prefills what is new), prefills one chunk of each new job,
then runs one decode step over every decoding row at once. New jobs therefore join a running batch between
two steps, and a cancelled job's row is free at the next step. Each job has its own sampler (seeded from
its own options), so a seeded request yields the same tokens batched as alone.

The worker sees token ids only; it reports events through `Job.emit` (called on the worker thread):
("token", id), ("done", Stats) or ("error", exception). Torch runs here, never on the event loop.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, WrenError
from ..generation import PREFILL_CHUNK
from ..kv import make_slot_cache, resolve_types
from ..sampling import Options, make_sampler, sample_rows


class QueueFullError(WrenError):
    """More requests are waiting than the server's --max-queue allows."""


@dataclass
class JobStats:
    prompt_tokens: int = 0  # the whole prompt
    prompt_evaluated: int = 0  # what was prefilled (the rest came from a reused prefix)
    prompt_seconds: float = 0.0
    generated: int = 0
    generate_seconds: float = 0.0
    queued_seconds: float = 0.0
    done_reason: str = ""


@dataclass
class Job:
    prompt: list[int]
    opts: Options
    stop_ids: set[int]
    emit: object  # callable(event tuple), thread-safe
    ctx: int
    constraint: object | None = None  # constrained.Constraint
    kv_types: tuple[str, str] | None = None  # this request's cache type; None: the engine's
    kind: str = "generate"  # or "embed"
    cancelled: bool = False
    stats: JobStats = field(default_factory=JobStats)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.job: Job | None = None
        self.tokens: list[int] = []  # ids whose K/V the row holds
        self.pending: list[int] = []  # prompt ids still to prefill
        self.history: list[int] = []  # prompt + generated, for the repeat penalties
        self.last: int | None = None  # sampled, not yet fed
        self.sampler = None
        self.first_token_at = 0.0


class Engine:
    """Owns a model and a SlotCache of `slots` rows; `submit` hands it a Job."""

    def __init__(self, model, *, slots: int = 4, ctx: int = 4096, max_queue: int = 512, metrics=None,
                 name: str = "", kv_types: tuple[str, str] | None = None):
        self.model, self.name, self.metrics = model, name, metrics
        self.n_slots, self.max_queue = max(1, slots), max_queue
        self.ctx = ctx
        self.default_kv_types = kv_types or resolve_types(model, getattr(model, "kv_cache", None))
        self.kv_types = self.default_kv_types  # the cache's type now
        self.cache = make_slot_cache(model, self.n_slots, ctx, self.kv_types)
        self.slots = [_Slot(i) for i in range(self.n_slots)]
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[Job] = []
        self._pending_count = 0  # submitted, not yet in a row (read from other threads)
        self._lock = threading.Lock()
        self._closing = False
        self.active_count = 0
        self.last_used = time.monotonic()
        self.thread = threading.Thread(target=self._loop, name=f"wren-engine-{name}", daemon=True)
        self.thread.start()

    # ---- called from the event loop ----------------------------------------------------------

    def submit(self, job: Job) -> Job:
        if job.kind == "generate" and len(job.prompt) >= job.ctx:
            raise ContextLengthError(f"the prompt has {len(job.prompt)} tokens but the context holds {job.ctx}; "
                                     "shorten it or raise num_ctx")
        with self._lock:
            if self._closing:
                raise WrenError("the model is being unloaded; try again")
            if self._pending_count >= self.max_queue:
                raise QueueFullError("server busy, please try again: maximum pending requests exceeded")
            self._pending_count += 1
        self.last_used = time.monotonic()
        self.inbox.put(job)
        return job

    @property
    def queue_depth(self) -> int:
        return self._pending_count

    @property
    def busy(self) -> bool:
        return self._pending_count > 0 or self.active_count > 0

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self.inbox.put(None)

    def nbytes(self) -> int:
        return self.cache.nbytes()

    # ---- the worker thread -------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            idle = not self.waiting and self.active_count == 0
            try:  # block only when there is nothing to do
                item = self.inbox.get() if idle else self.inbox.get_nowait()
            except queue.Empty:
                item = False
            while item is not False:
                if item is None:
                    return self._shutdown()
                self.waiting.append(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = False
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as exc:  # a bug or an allocation failure: fail the jobs, keep serving
                for slot in self.slots:
                    if slot.job is not None:
                        self._finish(slot, error=exc)
                        self.cache.truncate(slot.index, 0)
                        slot.tokens = []

    def _shutdown(self) -> None:
        err = WrenError("the model was unloaded")
        for slot in self.slots:
            if slot.job is not None:
                self._finish(slot, error=err)
        for job in self.waiting:
            self._dequeue(job)
            job.emit(("error", err))
        self.waiting.clear()

    def _dequeue(self, job: Job) -> None:
        with self._lock:
            self._pending_count -= 1

    def _iteration(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                self._finish(slot, reason="cancel")
        for job in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(job)
            self._dequeue(job)
            job.emit(("done", job.stats))
        while self.waiting and self.waiting[0].kind == "embed":
            self._embed(self.waiting.pop(0))
        self._admit()
        for slot in self.slots:
            if slot.job is not None and slot.pending:
                self._guarded(self._prefill_chunk, slot)
        decoding = [s for s in self.slots if s.job is not None and not s.pending and s.last is not None]
        if decoding:
            self._decode(decoding)

    def _admit(self) -> None:
        while self.waiting:
            job = self.waiting[0]
            if job.kind == "embed":
                self._embed(self.waiting.pop(0))
                continue
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            kv_types = job.kv_types or self.default_kv_types
            if job.ctx > self.cache.max_len or kv_types != self.kv_types:
                # A longer context or another cache type: reallocate once the batch has drained (rows of
                # one batch share one cache). The prefixes the rows held are gone with it.
                if self.active_count:
                    return
                self.ctx = max(job.ctx, self.cache.max_len)
                self.kv_types = kv_types
                self.cache = make_slot_cache(self.model, self.n_slots, self.ctx, kv_types)
                for s in self.slots:
                    s.tokens = []
            self.waiting.pop(0)
            self._dequeue(job)
            best, keep = free[0], 0
            for s in free:
                k = self._reusable(s, job.prompt)
                if k > keep:
                    best, keep = s, k
            self._start(best, job, keep)

    def _reusable(self, slot: _Slot, prompt: list[int]) -> int:
        old = slot.tokens
        k = 0
        for a, b in zip(old, prompt):
            if a != b:
                break
            k += 1
        k = min(k, len(prompt) - 1)  # at least one token must be fed to get logits
        window = self.cache.window
        if window is not None and len(old) > window and k < len(old) - 1:
            return 0  # the sliding ring has overwritten what a shorter prefix would need
        return k

    def _start(self, slot: _Slot, job: Job, keep: int) -> None:
        self.cache.truncate(slot.index, keep)
        slot.job, slot.tokens = job, job.prompt[:keep]
        slot.pending = job.prompt[keep:]
        slot.history = list(job.prompt)
        slot.last = None
        slot.sampler = None if job.constraint is not None else make_sampler(job.opts)
        job.stats.prompt_tokens = len(job.prompt)
        job.stats.prompt_evaluated = len(slot.pending)
        job.stats.queued_seconds = time.perf_counter() - job.submitted
        self.active_count += 1

    def _forward(self, rows: list[int], ids: list[list[int]]) -> torch.Tensor:
        self.cache.select(rows)
        x = torch.tensor(ids, device=self.cache.device)
        return self.model(x, self.cache, logits_to_keep=1)[:, -1]

    def _prefill_chunk(self, slot: _Slot) -> None:
        t0 = time.perf_counter()
        chunk, slot.pending = slot.pending[:PREFILL_CHUNK], slot.pending[PREFILL_CHUNK:]
        logits = self._forward([slot.index], [chunk])
        slot.tokens += chunk
        slot.job.stats.prompt_seconds += time.perf_counter() - t0
        if not slot.pending:
            slot.first_token_at = time.perf_counter()
            self._sample(slot, logits[0])

    def _decode(self, slots: list[_Slot]) -> None:
        for s in [s for s in slots if self.cache.lengths[s.index] + 1 > s.job.ctx]:
            self._finish(s, reason="length")
        slots = [s for s in slots if s.job is not None]
        if not slots:
            return
        logits = self._forward([s.index for s in slots], [[s.last] for s in slots])
        for s in slots:
            s.tokens.append(s.last)
        drawn = [i for i, s in enumerate(slots) if s.sampler is not None]  # (a constraint picks on its own)
        tokens = dict(zip(drawn, sample_rows([slots[i].sampler for i in drawn], logits[drawn],
                                             [slots[i].history for i in drawn], errors=True))) if drawn else {}
        for i, s in enumerate(slots):
            self._guarded(self._sample, s, logits[i], tokens.get(i))

    def _guarded(self, fn, slot: _Slot, *args) -> None:
        """Run one row's work; an error fails that row's request only."""
        try:
            fn(slot, *args)
        except Exception as exc:  # noqa: BLE001 -- reported to the one request
            if slot.job is not None:
                self._finish(slot, error=exc)
            self.cache.truncate(slot.index, 0)
            slot.tokens = []

    def _sample(self, slot: _Slot, logits: torch.Tensor, token: int | Exception | None = None) -> None:
        """Take the row's next token (drawn from its logits here unless given; an exception: its draw failed)
        and report it."""
        job = slot.job
        if isinstance(token, Exception):
            raise token
        if token is None:
            sampler = job.constraint.sample if job.constraint is not None else slot.sampler
            token = sampler(logits, slot.history)
        if token is None or token in job.stop_ids:
            return self._finish(slot, reason="stop")
        slot.history.append(token)
        slot.last = token
        job.stats.generated += 1
        job.stats.generate_seconds = time.perf_counter() - slot.first_token_at
        if self.metrics is not None:
            self.metrics.tokens_generated(1)
        job.emit(("token", token))
        limit = job.opts.num_predict
        closing = job.constraint is not None and job.constraint.forcing  # a JSON value being closed
        if limit >= 0 and job.stats.generated >= limit and not closing:
            self._finish(slot, reason="length")

    def _finish(self, slot: _Slot, reason: str = "", error: Exception | None = None) -> None:
        job, slot.job = slot.job, None
        slot.last, slot.pending, slot.sampler = None, [], None
        self.active_count -= 1
        self.last_used = time.monotonic()
        job.stats.done_reason = reason
        if error is not None:
            job.emit(("error", error))
        else:
            job.emit(("done", job.stats))

    def _embed(self, job: Job) -> None:
        self._dequeue(job)
        if job.cancelled:
            return job.emit(("done", job.stats))
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                vector = hidden_mean(self.model, job.prompt)
        except Exception as exc:  # noqa: BLE001 -- reported to the one request
            return job.emit(("error", exc))
        job.stats.prompt_tokens = job.stats.prompt_evaluated = len(job.prompt)
        job.stats.prompt_seconds = time.perf_counter() - t0
        job.emit(("embedding", vector))
        job.emit(("done", job.stats))


class _Stop(Exception):
    pass


def hidden_mean(model, ids: list[int]) -> list[float]:
    """The mean over positions of the last hidden state (after the final norm), as a list of floats.

    A forward hook on the final norm catches it and stops the forward there, so no model code changes and
    the vocabulary-wide head never runs."""
    caught = []

    def hook(_module, _inputs, output):
        caught.append(output)
        raise _Stop

    handle = model.norm.register_forward_hook(hook)
    try:
        model(torch.tensor([ids], device=model.norm.weight.device), None, logits_to_keep=0)
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught[0][0].float().mean(0).tolist()
