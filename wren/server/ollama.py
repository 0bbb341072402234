"""Ollama's API (docs/api.md), field for field: /api/generate, /api/chat, /api/embed(dings), the model
management routes, /api/ps, /api/version and /api/blobs. NDJSON streams by default; `stream: false` gives one
object. Errors are {"error": "..."} with Ollama's status codes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time
from datetime import datetime, timezone

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from ..errors import BadOptionError, ModelNotFoundError, WrenError
from .common import (HTTPError, Result, build_prompt, field_of, generate, make_options, model_name, nanos, read_json,
                     resolve_ctx)
from .constrained import root_for_format
from ..kv.types import spec_name
from ..sampling import Options
from .engine import Job
from .manager import parse_keep_alive
from .thinking import Thinking
from .threads import in_own_thread
from .tools import check_tools, maybe_tool_call, parse_tool_calls, render_messages

NDJSON = "application/x-ndjson"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def ndjson(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _no_images(body: dict, name: str) -> None:
    images = body.get("images")
    if images:
        raise HTTPError(400, f'"{name}" does not support images: wren runs the text decoder only')


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise HTTPError(400, "messages must be a list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HTTPError(400, f"each message needs a role and content, got {m!r:.100}")
        if m.get("images"):
            raise HTTPError(400, "this model does not support images: wren runs the text decoder only")
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise HTTPError(400, "message content must be a string")
    return [{**m, "content": m.get("content") or ""} for m in messages]


def _timings(result: Result, loaded, started: float, loaded_now: bool) -> dict:
    s = result.stats
    return {"total_duration": nanos(result.finished - started),
            "load_duration": nanos(loaded.load_seconds if loaded_now else 0.0),
            "prompt_eval_count": s.prompt_evaluated or s.prompt_tokens,
            "prompt_eval_duration": nanos(s.prompt_seconds),
            "eval_count": len(result.tokens), "eval_duration": nanos(s.generate_seconds)}


class _Session:
    """A request's hold on a loaded model: acquired up front, released when the response ends."""

    def __init__(self, request: Request, body: dict, name: str, num_ctx=None):
        self.app, self.request, self.body, self.name = request.app, request, body, name
        self.num_ctx = num_ctx
        self.loaded = None
        self.loaded_now = False
        self._detached = False
        self.started = time.perf_counter()

    async def __aenter__(self):
        manager = self.app.state.manager
        before = set(manager.loaded)
        self.loaded = await manager.acquire(self.name, self.body.get("keep_alive"), self.num_ctx)
        self.loaded_now = self.loaded.resolved.digest not in before
        return self

    async def __aexit__(self, *exc):
        if not self._detached:
            self.release()

    def detach(self) -> None:
        """A streamed response outlives the handler: it calls `release` itself when it ends."""
        self._detached = True

    def release(self) -> None:
        if self.loaded is not None:
            self.app.state.manager.release(self.loaded)
            self.loaded = None


def _options_ctx(body: dict):
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise HTTPError(400, "options must be a JSON object")
    num_ctx = (options or {}).get("num_ctx")
    if num_ctx is not None and (isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx < 1):
        raise HTTPError(400, "option num_ctx must be a positive integer")
    return options, num_ctx


async def _respond(session: _Session, body: dict, run, shape) -> Response:
    """Stream (NDJSON) or collect the chunks `run` yields; `shape(pieces, final)` builds each object.
    The job is submitted before the response starts, so queue and context errors keep their status."""
    stream = field_of(body, "stream", bool, True)
    agen = run()
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await session.__aexit__()
        raise
    if not stream:
        try:
            chunks = [] if first is None else [first]
            async for item in agen:
                chunks.append(item)
        finally:
            await session.__aexit__()
        return JSONResponse(shape(chunks, final=True))

    async def body_iter():
        try:
            if first is not None:
                yield ndjson(shape([first], final=False))
                async for item in agen:
                    yield ndjson(shape([item], final=False))
            yield ndjson(shape([], final=True))
        except WrenError as exc:
            yield ndjson({"error": str(exc)})
        finally:
            await agen.aclose()
            await session.__aexit__()

    return StreamingResponse(body_iter(), media_type=NDJSON)


async def api_generate(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    stream = field_of(body, "stream", bool, True)
    prompt = field_of(body, "prompt", str, "")
    system = field_of(body, "system", str)
    raw = field_of(body, "raw", bool, False)
    think = field_of(body, "think", (bool, str), False)
    context = field_of(body, "context", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in context):
        raise HTTPError(400, "context must be a list of token ids")
    if field_of(body, "suffix", str):
        raise HTTPError(400, f'"{name}" does not support insert (suffix)')
    _no_images(body, name)
    root = root_for_format(body.get("format"))
    options, num_ctx = _options_ctx(body)
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    manager = request.app.state.manager
    if not prompt and not context:  # Ollama's load / unload request
        if keep_alive == 0:
            await manager.unload_name(name)
            return JSONResponse({"model": name, "created_at": now_rfc3339(), "response": "", "done": True,
                                 "done_reason": "unload"})
        async with _Session(request, body, name, num_ctx):
            pass
        return JSONResponse({"model": name, "created_at": now_rfc3339(), "response": "", "done": True,
                             "done_reason": "load"})
    session = await _Session(request, body, name, num_ctx).__aenter__()
    try:
        loaded = session.loaded
        opts = make_options(loaded.resolved.parameters, options)
        if system is None:
            system = loaded.resolved.system
        ids = build_prompt(loaded, prompt=prompt, system=system, raw=raw, think=bool(think))
        if context:
            if ids and ids[0] == loaded.model.tokenizer.bos_id:
                ids = ids[1:]
            ids = list(context) + ids
        if max(ids) >= loaded.model.config.vocab_size:
            raise HTTPError(400, "context holds a token id outside the vocabulary")
    except BaseException:
        await session.__aexit__()
        raise
    result = Result()

    async def run():
        async for piece in generate(request.app, loaded, ids, opts, root=root, result=result,
                                    request=None if stream else request, split_thinking=bool(think)):
            yield piece

    def shape(pieces, final):
        out = {"model": name, "created_at": now_rfc3339(), "response": _text(pieces), "done": final}
        if _thinking(pieces):
            out["thinking"] = _thinking(pieces)
        if final:
            out["done_reason"] = result.done_reason or "stop"
            if not raw:
                out["context"] = ids + result.tokens
            out |= _timings(result, loaded, session.started, session.loaded_now)
        return out

    return await _respond(session, body, run, shape)


async def api_chat(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    stream = field_of(body, "stream", bool, True)
    messages = _check_messages(body.get("messages") or [])
    think = field_of(body, "think", (bool, str), False)
    functions = check_tools(body.get("tools"))
    root = root_for_format(body.get("format"))
    options, num_ctx = _options_ctx(body)
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    manager = request.app.state.manager
    if not messages:  # load / unload
        if keep_alive == 0:
            await manager.unload_name(name)
            reason = "unload"
        else:
            async with _Session(request, body, name, num_ctx):
                reason = "load"
        return JSONResponse({"model": name, "created_at": now_rfc3339(),
                             "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": reason})
    session = await _Session(request, body, name, num_ctx).__aenter__()
    try:
        loaded = session.loaded
        opts = make_options(loaded.resolved.parameters, options)
        history = render_messages(messages, functions)
        ids = build_prompt(loaded, messages=history, system=loaded.resolved.system, think=bool(think))
    except BaseException:
        await session.__aexit__()
        raise
    result = Result()

    async def run():
        held = ""  # text that may be a tool call, not yet streamed
        streaming = not functions
        async for piece in generate(request.app, loaded, ids, opts, root=root, result=result,
                                    request=None if stream else request, split_thinking=bool(think)):
            if streaming or isinstance(piece, Thinking):
                yield piece
                continue
            held += piece
            if not maybe_tool_call(held):
                streaming = True
                yield held
        if not streaming and held:
            calls = parse_tool_calls(held, functions)
            yield _ToolCalls(calls) if calls else held

    def shape(pieces, final):
        calls = [c for p in pieces if isinstance(p, _ToolCalls) for c in p.calls]
        message = {"role": "assistant", "content": _text(pieces)}
        if _thinking(pieces):
            message["thinking"] = _thinking(pieces)
        if calls:
            message["tool_calls"] = [{"function": {"index": i, "name": c["name"], "arguments": c["arguments"]}}
                                     for i, c in enumerate(calls)]
        out = {"model": name, "created_at": now_rfc3339(), "message": message, "done": final}
        if final:
            out["done_reason"] = result.done_reason or "stop"
            out |= _timings(result, loaded, session.started, session.loaded_now)
        return out

    return await _respond(session, body, run, shape)


def _text(pieces) -> str:
    return "".join(p for p in pieces if isinstance(p, str) and not isinstance(p, Thinking))


def _thinking(pieces) -> str:
    return "".join(p for p in pieces if isinstance(p, Thinking))


class _ToolCalls:
    def __init__(self, calls):
        self.calls = calls


async def embed_ids(request, loaded, ids: list[int]) -> list[float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    vector: list = []

    def emit(event):
        def deliver():
            if event[0] == "embedding":
                vector.append(event[1])
            elif event[0] == "error" and not done.done():
                done.set_exception(event[1])
            elif event[0] == "done" and not done.done():
                done.set_result(None)
        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            pass

    job = Job(ids, Options(), set(), emit, 0, kind="embed")
    loaded.engine.submit(job)
    try:
        await done
    finally:
        job.cancel()
    request.app.state.metrics.prompt_tokens(len(ids))
    return vector[0]


def _embed_ids(loaded, text: str, truncate: bool, ctx: int) -> list[int]:
    ids = loaded.model.tokenizer.encode(text, add_bos=True)
    if len(ids) > ctx:
        if not truncate:
            raise HTTPError(400, f"the input has {len(ids)} tokens, more than the context length {ctx}; "
                                 "shorten it or set truncate")
        ids = ids[:ctx]
    return ids


def _normalise(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


async def api_embed(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    inputs = body.get("input", [])
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise HTTPError(400, "input must be a string or a list of strings")
    truncate = field_of(body, "truncate", bool, True)
    dims = field_of(body, "dimensions", int)
    if dims is not None and dims < 1:
        raise HTTPError(400, "dimensions must be a positive integer")
    options, num_ctx = _options_ctx(body)
    parse_keep_alive(body.get("keep_alive"))
    async with _Session(request, body, name, num_ctx) as session:
        loaded = session.loaded
        opts = make_options(loaded.resolved.parameters, options)
        ctx = resolve_ctx(loaded, opts)
        vectors, count = [], 0
        for text in inputs:
            ids = _embed_ids(loaded, text, truncate, ctx)
            count += len(ids)
            v = await embed_ids(request, loaded, ids)
            if dims is not None:
                v = v[:dims]
            vectors.append(_normalise(v))
        return JSONResponse({"model": name, "embeddings": vectors,
                             "total_duration": nanos(time.perf_counter() - session.started),
                             "load_duration": nanos(loaded.load_seconds if session.loaded_now else 0),
                             "prompt_eval_count": count})


async def api_embeddings(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    prompt = field_of(body, "prompt", str, "")
    options, num_ctx = _options_ctx(body)
    parse_keep_alive(body.get("keep_alive"))
    async with _Session(request, body, name, num_ctx) as session:
        if not prompt:
            return JSONResponse({"embedding": []})
        loaded = session.loaded
        ctx = resolve_ctx(loaded, make_options(loaded.resolved.parameters, options))
        ids = _embed_ids(loaded, prompt, True, ctx)
        return JSONResponse({"embedding": await embed_ids(request, loaded, ids)})


# ---- model management -------------------------------------------------------------------------------


def _details(d: dict) -> dict:
    d = dict(d or {})
    return {"parent_model": d.get("parent_model", ""), "format": d.get("format", ""),
            "family": d.get("family", ""), "families": d.get("families") or ([d["family"]] if d.get("family") else None),
            "parameter_size": d.get("parameter_size", ""), "quantization_level": d.get("quantization_level", "")}


async def api_tags(request: Request) -> Response:
    store = request.app.state.store
    entries = await asyncio.to_thread(store.list)
    return JSONResponse({"models": [{"name": e.name, "model": e.name, "modified_at": iso(e.modified_at),
                                     "size": e.size, "digest": e.digest.removeprefix("sha256:"),
                                     "details": _details(e.details)} for e in entries]})


def _parameters_text(params: dict) -> str:
    lines = []
    for key, value in (params or {}).items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines)


def _model_info(path) -> tuple[dict, str]:
    """Ollama's model_info keys, from the model's config (no weights are read)."""
    from pathlib import Path

    from ..config import config_from_dict

    path = Path(path)
    if path.is_dir():
        cfg = config_from_dict(json.loads((path / "config.json").read_text()))
    else:
        from ..weights.gguf import GGUFFile, config_dict
        cfg = config_from_dict(config_dict(GGUFFile(path)))
    arch = cfg.model_type
    info = {"general.architecture": arch, f"{arch}.context_length": cfg.max_position_embeddings,
            f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.block_count": cfg.num_hidden_layers,
            f"{arch}.attention.head_count": cfg.num_attention_heads,
            f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
            f"{arch}.attention.sliding_window": cfg.sliding_window, f"{arch}.vocab_size": cfg.vocab_size}
    return info, arch


async def api_show(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    store = request.app.state.store
    resolved = await asyncio.to_thread(store.resolve, name)
    modelfile = await asyncio.to_thread(store.modelfile, name)
    try:
        info, arch = await asyncio.to_thread(_model_info, resolved.model_path)
    except (OSError, ValueError, TypeError, KeyError, WrenError) as exc:
        raise HTTPError(400, f"model {name!r} is in the store but its file is unreadable ({exc})") from None
    capabilities = ["completion", "tools"] + (["thinking"] if arch == "gemma4" else [])
    out = {"modelfile": modelfile, "parameters": _parameters_text(resolved.parameters),
           "template": resolved.template or "", "details": _details(resolved.details), "model_info": info,
           "capabilities": capabilities, "modified_at": iso(resolved.modified_at)}
    if resolved.system:
        out["system"] = resolved.system
    if resolved.license:
        out["license"] = resolved.license
    return JSONResponse(out)


async def _progress_stream(request: Request, body: dict, work, statuses: tuple[str, ...]) -> Response:
    """Run `work(progress)` in a thread; stream its progress as Ollama's {"status", "digest", "total",
    "completed"} lines, or answer once with {"status": "success"} when stream is false."""
    stream = field_of(body, "stream", bool, True)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def progress(done, total, label=""):
        loop.call_soon_threadsafe(events.put_nowait, ("progress", done, total, label))

    async def runner():
        try:
            await in_own_thread(work, progress)  # (torch work: threads.py says why)
            events.put_nowait(("done",))
        except BaseException as exc:  # reported to the client
            events.put_nowait(("error", exc))

    task = asyncio.get_running_loop().create_task(runner())
    request.state.task = task
    if not stream:
        while True:
            event = await events.get()
            if event[0] == "error":
                raise event[1]
            if event[0] == "done":
                return JSONResponse({"status": "success"})
    first = await events.get()
    if first[0] == "error":
        raise first[1]

    async def lines():
        for status in statuses:
            yield ndjson({"status": status})
        event = first
        while True:
            if event[0] == "progress":
                _, done, total, label = event
                yield ndjson({"status": f"copying {label}".strip(), "digest": label, "total": total,
                              "completed": done})
            elif event[0] == "error":
                status = getattr(event[1], "status", None)
                yield ndjson({"error": str(event[1]) if status != 500 else "internal error"})
                return
            else:
                yield ndjson({"status": "success"})
                return
            event = await events.get()

    return StreamingResponse(lines(), media_type=NDJSON)


async def api_pull(request: Request) -> Response:
    body = await read_json(request)
    source = model_name(body)
    store = request.app.state.store
    return await _progress_stream(request, body, lambda progress: store.pull(source, progress=progress),
                                  ("pulling manifest",))


def _modelfile_from_request(body: dict) -> tuple[str, dict | None]:
    legacy = field_of(body, "modelfile", str)
    files = field_of(body, "files", dict)
    adapters = field_of(body, "adapters", dict)
    if field_of(body, "quantize", str):
        raise HTTPError(400, "wren serve does not quantize on create; use `wren quantize` and create from its folder")
    if legacy:
        return legacy, files
    from ..store.modelfile import render

    source = field_of(body, "from", str)
    if source is None:
        if not files:
            raise HTTPError(400, "create needs \"from\" (a model, or a path) or \"files\" (uploaded blobs)")
        source = next(iter(files)) if len(files) == 1 else "."
    all_files = {**(files or {}), **(adapters or {})}
    license_ = body.get("license")
    licenses = [license_] if isinstance(license_, str) else license_ or []
    if not isinstance(licenses, list) or not all(isinstance(t, str) for t in licenses):
        raise HTTPError(400, "license must be a string or a list of strings")
    params = field_of(body, "parameters", dict, {})
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise HTTPError(400, "messages must be a list of {role, content}")
    text = render(source, template=field_of(body, "template", str), system=field_of(body, "system", str),
                  parameters=params, adapters=list(adapters or {}), messages=messages, licenses=licenses)
    return text, all_files or None


async def api_create(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    text, files = _modelfile_from_request(body)
    store = request.app.state.store

    def work(progress):
        store.create(name, text, progress=progress, files=files)

    return await _progress_stream(request, body, work, ("parsing modelfile",))


async def api_copy(request: Request) -> Response:
    body = await read_json(request)
    source = field_of(body, "source", str)
    destination = field_of(body, "destination", str)
    if not source or not destination:
        raise HTTPError(400, "copy needs a source and a destination")
    await asyncio.to_thread(request.app.state.store.copy, source, destination)
    return Response(status_code=200)


async def api_delete(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    store, manager = request.app.state.store, request.app.state.manager
    try:
        resolved = await asyncio.to_thread(store.resolve, name)
        manager.forget(resolved.digest)
    except WrenError:
        pass  # a corrupt entry can still be deleted
    await asyncio.to_thread(store.delete, name)
    return Response(status_code=200)


async def api_ps(request: Request) -> Response:
    manager = request.app.state.manager
    models = []
    for m in list(manager.loaded.values()):
        expires = m.expires_at
        if m.busy or expires is None:
            when = datetime(2318, 1, 1, tzinfo=timezone.utc) if m.keep_alive is None else \
                datetime.fromtimestamp(datetime.now().timestamp() + (m.keep_alive or 0), tz=timezone.utc)
        else:
            when = datetime.fromtimestamp(expires, tz=timezone.utc)
        models.append({"name": m.name, "model": m.name, "size": m.nbytes, "digest": m.resolved.digest.removeprefix("sha256:"),
                       "details": _details(m.resolved.details), "expires_at": iso(when), "size_vram": 0,
                       "context_length": m.engine.ctx, "kv_cache": spec_name(m.engine.kv_types),
                       "kv_cache_bytes": m.engine.nbytes()})
    return JSONResponse({"models": models})


async def api_version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


def _digest(request: Request) -> str:
    digest = request.path_params["digest"].replace("sha256-", "sha256:", 1)
    from ..store import check_digest
    try:
        check_digest(digest)
    except BadOptionError:
        raise HTTPError(400, f"invalid digest {request.path_params['digest']!r}: expected sha256:<64 hex>") from None
    return digest


async def api_blob_head(request: Request) -> Response:
    digest = _digest(request)
    exists = await asyncio.to_thread(request.app.state.store.has_blob, digest)
    if not exists:
        raise ModelNotFoundError(f"blob {digest} not found")
    return Response(status_code=200)


async def api_blob_post(request: Request) -> Response:
    digest = _digest(request)
    store = request.app.state.store
    if await asyncio.to_thread(store.has_blob, digest):
        # drain the body so the client sees a clean 201
        try:
            async for _ in request.stream():
                pass
        except ClientDisconnect:
            pass
        return Response(status_code=201)
    expected = request.headers.get("content-length")
    fd, spool = tempfile.mkstemp(prefix=".upload-", dir=None)
    received = 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                async for chunk in request.stream():
                    received += len(chunk)
                    f.write(chunk)
            except ClientDisconnect:
                raise HTTPError(400, f"the upload of {digest} was cut off after {received} bytes; nothing was "
                                     "stored") from None
        if expected is not None and expected.isdigit() and int(expected) != received:
            raise HTTPError(400, f"the upload of {digest} has {received} of {expected} bytes; nothing was stored")

        def chunks():
            with open(spool, "rb") as f:
                while block := f.read(1 << 20):
                    yield block

        await asyncio.to_thread(store.put_blob, digest, chunks())
    finally:
        os.unlink(spool)
    return Response(status_code=201)
