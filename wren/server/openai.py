"""OpenAI's API, a thin layer over the same engine: /v1/chat/completions, /v1/completions, /v1/models,
/v1/embeddings. Streams are server-sent events ending in `data: [DONE]`; errors are
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .common import HTTPError, Result, build_prompt, field_of, generate, make_options, model_name, resolve_ctx
from .constrained import compile_schema
from .ollama import _embed_ids, _normalise, _Session, embed_ids
from .tools import call_schema, check_tools, maybe_tool_call, parse_tool_calls, render_messages

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 503: "server_busy"}


def error_body(status: int, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param,
                      "code": code}}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _number(body, key, kind=(int, float)):
    value = field_of(body, key, kind)
    return value


def _sampling(body: dict) -> dict:
    """OpenAI's sampling fields -> wren option names; also top_k, min_p and repeat_penalty, as llama.cpp's
    and vLLM's OpenAI servers take them."""
    out = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                     ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                     ("top_k", "top_k"), ("min_p", "min_p"), ("repeat_penalty", "repeat_penalty")):
        value = _number(body, src, int if src in ("seed", "top_k") else (int, float))
        if value is not None:
            out[dst] = value
    limit = field_of(body, "max_completion_tokens", int)
    if limit is None:
        limit = field_of(body, "max_tokens", int)
    if limit is not None:
        if limit < 1:
            raise HTTPError(400, "max_tokens must be at least 1")
        out["num_predict"] = limit
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise HTTPError(400, "stop must be a string or a list of strings")
        out["stop"] = stop
    n = field_of(body, "n", int, 1)
    if n != 1:
        raise HTTPError(400, "only n=1 is supported")
    return out


def _response_format(body: dict):
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise HTTPError(400, "response_format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        from .constrained import ANY_OBJECT
        return ANY_OBJECT
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise HTTPError(400, "response_format json_schema needs {\"name\", \"schema\": {...}}")
    return compile_schema(spec.get("schema", {}))


def _tool_choice(body: dict, functions: list[dict]):
    """A schema root that forces a call, for tool_choice "required" or a named function; else None."""
    choice = body.get("tool_choice")
    if choice in (None, "auto", "none") or not functions:
        return None
    if choice == "required":
        return compile_schema(call_schema(functions))
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return compile_schema(call_schema(functions, choice["function"].get("name")))
    raise HTTPError(400, "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", ...}")


def _usage(result: Result) -> dict:
    p, c = result.stats.prompt_tokens, len(result.tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(result: Result, calls) -> str:
    if calls:
        return "tool_calls"
    return "length" if result.done_reason == "length" else "stop"


def _tool_calls(calls) -> list[dict]:
    return [{"id": f"call_{secrets.token_hex(8)}", "type": "function", "index": i,
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for i, c in enumerate(calls)]


async def chat_completions(request: Request) -> Response:
    from .ollama import _check_messages

    body = await read_body(request)
    name = model_name(body)
    messages = _check_messages(_flatten(body.get("messages")))
    if not messages:
        raise HTTPError(400, "messages must not be empty")
    functions = check_tools(body.get("tools"))
    if body.get("tool_choice") == "none":
        functions = []
    root = _tool_choice(body, functions) or _response_format(body)
    stream = field_of(body, "stream", bool, False)
    stream_options = field_of(body, "stream_options", dict, {})
    sampling = _sampling(body)
    async with _Session(request, body, name, None) as session:
        loaded = session.loaded
        opts = make_options(loaded.resolved.parameters, sampling)
        ids = build_prompt(loaded, messages=render_messages(messages, functions), system=loaded.resolved.system)
        result = Result()
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        base = {"id": rid, "created": created, "model": name, "system_fingerprint": "fp_wren"}
        gen = generate(request.app, loaded, ids, opts, root=root, result=result, request=None if stream else request)
        if not stream:
            text = "".join([piece async for piece in gen])
            calls = parse_tool_calls(text, functions) if functions else None
            message = {"role": "assistant", "content": None if calls else text}
            if calls:
                message["tool_calls"] = _tool_calls(calls)
            return JSONResponse(base | {"object": "chat.completion", "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(result, calls)}],
                "usage": _usage(result)})
        first = await _first(gen)
        session.detach()

    async def events():
        chunk = base | {"object": "chat.completion.chunk"}
        try:
            yield _sse(chunk | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
            held, streaming, calls = "", not functions, None
            async for piece in _chain(first, gen):
                if not streaming:
                    held += piece
                    if maybe_tool_call(held):
                        continue
                    streaming, piece = True, held
                yield _sse(chunk | {"choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                                 "finish_reason": None}]})
            if not streaming and held:
                calls = parse_tool_calls(held, functions)
                delta = {"tool_calls": _tool_calls(calls)} if calls else {"content": held}
                yield _sse(chunk | {"choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": None}]})
            yield _sse(chunk | {"choices": [{"index": 0, "delta": {}, "logprobs": None,
                                             "finish_reason": _finish(result, calls)}]})
            if stream_options.get("include_usage"):
                yield _sse(chunk | {"choices": [], "usage": _usage(result)})
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 -- the stream has begun: report in-band
            yield _sse(error_body(500, str(exc)))
        finally:
            await gen.aclose()
            session.release()

    return StreamingResponse(events(), media_type="text/event-stream")


async def completions(request: Request) -> Response:
    body = await read_body(request)
    name = model_name(body)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HTTPError(400, "prompt must be a string (one prompt per request)")
    if field_of(body, "suffix", str):
        raise HTTPError(400, "suffix (insert) is not supported")
    stream = field_of(body, "stream", bool, False)
    stream_options = field_of(body, "stream_options", dict, {})
    sampling = _sampling(body)
    async with _Session(request, body, name, None) as session:
        loaded = session.loaded
        opts = make_options(loaded.resolved.parameters, sampling)
        ids = build_prompt(loaded, prompt=prompt, raw=True)  # a completion continues the text as written
        result = Result()
        base = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": name,
                "system_fingerprint": "fp_wren"}
        gen = generate(request.app, loaded, ids, opts, result=result, request=None if stream else request)
        if not stream:
            text = "".join([piece async for piece in gen])
            return JSONResponse(base | {"object": "text_completion", "choices": [
                {"text": text, "index": 0, "logprobs": None, "finish_reason": _finish(result, None)}],
                "usage": _usage(result)})
        first = await _first(gen)
        session.detach()

    async def events():
        chunk = base | {"object": "text_completion"}
        try:
            async for piece in _chain(first, gen):
                yield _sse(chunk | {"choices": [{"text": piece, "index": 0, "logprobs": None,
                                                 "finish_reason": None}]})
            yield _sse(chunk | {"choices": [{"text": "", "index": 0, "logprobs": None,
                                             "finish_reason": _finish(result, None)}]})
            if stream_options.get("include_usage"):
                yield _sse(chunk | {"choices": [], "usage": _usage(result)})
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001
            yield _sse(error_body(500, str(exc)))
        finally:
            await gen.aclose()
            session.release()

    return StreamingResponse(events(), media_type="text/event-stream")


_EMPTY = object()


async def _first(gen):
    """Wait for the first piece, so that errors before any output keep their HTTP status."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return _EMPTY


async def _chain(first, gen):
    if first is _EMPTY:
        return
    yield first
    async for piece in gen:
        yield piece


def _flatten(messages):
    """OpenAI content parts -> text (images refused), tool messages keep their call id."""
    if not isinstance(messages, list):
        raise HTTPError(400, "messages must be a list")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise HTTPError(400, "each message must be an object")
        content = m.get("content")
        if isinstance(content, list):
            if any(isinstance(p, dict) and p.get("type") not in ("text", None) for p in content):
                raise HTTPError(400, "only text content is supported: this model build has no vision or audio")
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        m = {**m, "content": content}
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("tool_calls"):
            m["tool_calls"] = [{"function": {"name": c.get("function", {}).get("name"),
                                             "arguments": c.get("function", {}).get("arguments")}}
                               for c in m["tool_calls"] if isinstance(c, dict)]
        out.append(m)
    return out


async def list_models(request: Request) -> Response:
    import asyncio

    entries = await asyncio.to_thread(request.app.state.store.list)
    return JSONResponse({"object": "list", "data": [
        {"id": e.name, "object": "model", "created": int(e.modified_at.timestamp()), "owned_by": "library"}
        for e in entries]})


async def get_model(request: Request) -> Response:
    import asyncio

    name = request.path_params["model"]
    resolved = await asyncio.to_thread(request.app.state.store.resolve, name)
    return JSONResponse({"id": resolved.name, "object": "model", "created": int(resolved.modified_at.timestamp()),
                         "owned_by": "library"})


async def embeddings(request: Request) -> Response:
    body = await read_body(request)
    name = model_name(body)
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(
            isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in x)) for x in inputs):
        raise HTTPError(400, "input must be a string, a list of strings, or token id lists", )
    encoding = field_of(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise HTTPError(400, "encoding_format must be \"float\" or \"base64\"")
    dims = field_of(body, "dimensions", int)
    async with _Session(request, body, name, None) as session:
        loaded = session.loaded
        ctx = resolve_ctx(loaded, make_options(loaded.resolved.parameters, {}))
        data, count = [], 0
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                ids = _embed_ids(loaded, item, True, ctx)
            else:
                if any(t >= loaded.model.config.vocab_size or t < 0 for t in item) or not item:
                    raise HTTPError(400, "token ids must be in the vocabulary")
                ids = item[:ctx]
            count += len(ids)
            v = await embed_ids(request, loaded, ids)
            v = _normalise(v[:dims] if dims else v)
            vec = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if encoding == "base64" else v
            data.append({"object": "embedding", "embedding": vec, "index": i})
    return JSONResponse({"object": "list", "data": data, "model": name,
                         "usage": {"prompt_tokens": count, "total_tokens": count}})


async def read_body(request: Request) -> dict:
    from .common import read_json

    return await read_json(request)
