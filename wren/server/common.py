"""What both wire formats share: request bodies, errors, options, prompts, and the text stream of one job.

`generate` submits a Job to a loaded model's engine and turns its token events into text pieces (streaming
detokenizer, stop strings), on the event loop; the worker thread only ever sees ids.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from starlette.requests import ClientDisconnect, Request

from .. import chat
from ..errors import (BadOptionError, ContextLengthError, ModelFormatError, ModelNotFoundError, UnsupportedModelError,
                      WrenError)
from ..generation import StopStrings, prompt_ids
from ..kv import resolve_types
from ..sampling import Options
from ..tokenizer import StreamDetokenizer
from .constrained import Constraint, TokenTable
from .engine import Job, JobStats, QueueFullError
from .thinking import ThoughtSplitter
from .threads import in_own_thread

MAX_BODY = 64 << 20

# Ollama option names wren accepts but has no use for (runner and hardware settings).
IGNORED_OPTIONS = {"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
                   "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep", "tfs_z", "typical_p",
                   "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline", "rope_frequency_base",
                   "rope_frequency_scale", "num_gqa"}


class HTTPError(WrenError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def status_for(exc: Exception) -> int:
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, QueueFullError):
        return 503
    if isinstance(exc, (BadOptionError, ContextLengthError, ModelFormatError, UnsupportedModelError, WrenError)):
        return 400
    return 500


async def read_json(request: Request) -> dict:
    """The request body as a JSON object; HTTPError 400 for anything else."""
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise HTTPError(400, "the client went away before sending the whole body") from None
    if len(raw) > MAX_BODY:
        raise HTTPError(413, "request body too large")
    if not raw.strip():
        raise HTTPError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, f"invalid JSON in the request body: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def field_of(body: dict, key: str, kinds, default=None, name: str | None = None):
    """body[key] if it is one of `kinds` (None counts as missing), else a 400 naming the field."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise HTTPError(400, f"field {name or key!r} has the wrong type ({type(value).__name__})")
    if not isinstance(value, kinds):
        raise HTTPError(400, f"field {name or key!r} has the wrong type ({type(value).__name__})")
    return value


def model_name(body: dict) -> str:
    name = field_of(body, "model", str) or field_of(body, "name", str)
    if not name:
        raise HTTPError(400, "model is required")
    return name


def make_options(defaults: dict, overrides: dict | None) -> Options:
    """A model's stored parameters, then the request's options on top. Unknown names are a 400."""
    if overrides is not None and not isinstance(overrides, dict):
        raise HTTPError(400, "options must be a JSON object")
    merged = {k: v for k, v in (defaults or {}).items() if k not in IGNORED_OPTIONS}
    for key, value in (overrides or {}).items():
        if key in IGNORED_OPTIONS:
            continue
        merged[key] = value
    return Options.from_dict(merged)


def resolve_ctx(loaded, opts: Options) -> int:
    return max(1, min(opts.num_ctx, loaded.model.config.max_position_embeddings))


def build_prompt(loaded, *, prompt=None, messages=None, system=None, raw=False, think=False) -> list[int]:
    """Token ids through the model's chat template (messages, or a prompt string), or a raw prompt."""
    model = loaded.model
    if think and chat.template_for(model).system_role is None:
        raise HTTPError(400, f'"{loaded.name}" does not support thinking')
    if messages is not None:
        stored = loaded.resolved.messages or []
        history = list(stored) + list(messages)
        if system is not None and not (history and history[0].get("role") == "system"):
            history.insert(0, {"role": "system", "content": system})
        return prompt_ids(model, history, think=think)
    return prompt_ids(model, prompt, system=system, raw=raw, think=think)


@dataclass
class Result:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    stats: JobStats = field(default_factory=JobStats)
    done_reason: str = ""
    started: float = field(default_factory=time.perf_counter)
    first_token: float = 0.0
    finished: float = 0.0


def stop_ids_for(model) -> set[int]:
    return chat.stop_ids(model.tokenizer, chat.template_for(model))


async def make_constraint(loaded, root, opts: Options):
    if root is None:
        return None
    model = loaded.model
    table = await in_own_thread(TokenTable.get, model.tokenizer, model.config.vocab_size)
    return Constraint(root, table, opts, stop_ids_for(model))


async def generate(app, loaded, ids: list[int], opts: Options, *, root=None, request: Request | None = None,
                   result: Result | None = None, split_thinking: bool = False):
    """Yield text pieces of the reply; `result` is filled in as it goes (stats, done_reason at the end).
    With `split_thinking`, pieces of Gemma 4's thought channel come as `thinking.Thinking` strings.
    Cancels the job when the consumer stops early (client gone, stop string)."""
    result = result if result is not None else Result()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    model = loaded.model
    job = Job(ids, opts, stop_ids_for(model), emit, resolve_ctx(loaded, opts),
              await make_constraint(loaded, root, opts),
              kv_types=resolve_types(model, opts.kv_cache) if opts.kv_cache else None)
    loaded.engine.submit(job)
    metrics = app.state.metrics
    metrics.prompt_tokens(len(ids))
    detok = StreamDetokenizer(model.tokenizer)
    stops = StopStrings(opts.stop)
    thoughts = ThoughtSplitter(model.tokenizer) if split_thinking else None
    try:
        while True:
            event = await _next_event(events, request)
            kind = event[0]
            if kind == "token":
                if not result.tokens:
                    result.first_token = time.perf_counter()
                    metrics.first_token(result.first_token - result.started)
                result.tokens.append(event[1])
                if thoughts is not None:
                    thoughts.token(event[1])
                text, hit = stops.push(detok.push(event[1]))
                if thoughts is not None and text:
                    text = thoughts.text(text)
                if text:
                    result.text += text
                    yield text
                if hit:
                    result.done_reason = "stop"
                    job.cancel()
                    break
            elif kind == "done":
                result.stats = event[1]
                result.done_reason = event[1].done_reason or "stop"
                tail, _ = stops.push(detok.flush())
                tail += stops.flush()
                if tail:
                    result.text += tail
                    yield tail
                break
            elif kind == "error":
                raise event[1]
    finally:
        job.cancel()
        result.stats = job.stats
        result.finished = time.perf_counter()


async def _next_event(events: asyncio.Queue, request: Request | None):
    if request is None:
        return await events.get()
    while True:  # a non-streaming request: notice a client that gave up
        try:
            return await asyncio.wait_for(events.get(), 0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientDisconnect() from None


async def collect(gen) -> str:
    return "".join([piece async for piece in gen])


def nanos(seconds: float) -> int:
    return int(seconds * 1e9)
