"""The ASGI app (Starlette on uvicorn): routes, API-key check, CORS, error bodies, and `wren serve`.

Settings come from flags, then environment variables named like Ollama's: WREN_HOST (host[:port]),
WREN_API_KEY, WREN_ORIGINS (comma-separated), WREN_MAX_QUEUE, WREN_NUM_PARALLEL, WREN_MAX_LOADED_MODELS,
WREN_KEEP_ALIVE.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import WrenError
from ..kv.types import kv_cache_types
from . import ollama, openai
from .common import HTTPError, status_for
from .manager import Manager, parse_keep_alive
from .metrics import Metrics

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11435
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:\d+)?|app://.*|file://.*|tauri://.*|vscode-webview://.*"
log = logging.getLogger("wren.server")


@dataclass
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 512
    parallel: int = 4
    max_loaded: int = 3
    memory_budget: int | None = None
    keep_alive: float | None = 300.0
    kv_cache: str | None = None
    exact_weights: bool = False  # --exact-weights: GGUF weights dequantized, not run as int8 levels
    low_memory: bool = False  # --low-memory: GGUF linear layers read in their block formats, in place


def parse_host(value: str | None) -> tuple[str, int]:
    """WREN_HOST / --host: "host", "host:port", ":port", "[::1]:port" or with an http:// prefix."""
    if not value:
        return DEFAULT_HOST, DEFAULT_PORT
    text = value.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1:]
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = int(p) if p else DEFAULT_PORT
    return host or DEFAULT_HOST, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every route but / and /api/version when a key is set."""

    OPEN = {"/", "/api/version"}

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in self.OPEN:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.key.encode()):
                body = _error_body(scope["path"], 401, "unauthorized: send Authorization: Bearer <api key>")
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_body(path: str, status: int, message: str) -> dict:
    if path.startswith("/v1/"):
        return openai.error_body(status, message)
    return {"error": message}


def _wrap(route_name: str, handler):
    """Error mapping and request counting around a handler."""

    async def endpoint(request: Request) -> Response:
        metrics: Metrics = request.app.state.metrics
        try:
            response = await handler(request)
        except ClientDisconnect:
            metrics.request(route_name, 499)
            return Response(status_code=499)
        except (WrenError, HTTPError) as exc:
            status = status_for(exc)
            metrics.request(route_name, status)
            return JSONResponse(_error_body(request.url.path, status, str(exc)), status_code=status)
        except Exception as exc:  # noqa: BLE001 -- a bug: answer 500, keep serving
            log.exception("internal error on %s", request.url.path)
            metrics.request(route_name, 500)
            return JSONResponse(_error_body(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}"),
                                status_code=500)
        metrics.request(route_name, response.status_code)
        return response

    return endpoint


async def root(request: Request) -> Response:
    return PlainTextResponse("Wren is running")


async def metrics_route(request: Request) -> Response:
    text = request.app.state.metrics.render(request.app.state.manager)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def routes() -> list[Route]:
    table = [
        ("/api/generate", ollama.api_generate, ["POST"]), ("/api/chat", ollama.api_chat, ["POST"]),
        ("/api/embed", ollama.api_embed, ["POST"]), ("/api/embeddings", ollama.api_embeddings, ["POST"]),
        ("/api/tags", ollama.api_tags, ["GET", "HEAD"]), ("/api/show", ollama.api_show, ["POST"]),
        ("/api/create", ollama.api_create, ["POST"]), ("/api/copy", ollama.api_copy, ["POST"]),
        ("/api/delete", ollama.api_delete, ["DELETE"]), ("/api/pull", ollama.api_pull, ["POST"]),
        ("/api/ps", ollama.api_ps, ["GET"]), ("/api/version", ollama.api_version, ["GET", "HEAD"]),
        ("/api/blobs/{digest}", ollama.api_blob_head, ["HEAD"]),
        ("/api/blobs/{digest}", ollama.api_blob_post, ["POST"]),
        ("/v1/chat/completions", openai.chat_completions, ["POST"]), ("/v1/completions", openai.completions, ["POST"]),
        ("/v1/models", openai.list_models, ["GET"]), ("/v1/models/{model:path}", openai.get_model, ["GET"]),
        ("/v1/embeddings", openai.embeddings, ["POST"]),
    ]
    out = [Route("/", root, methods=["GET", "HEAD"]), Route("/metrics", _wrap("/metrics", metrics_route), methods=["GET"])]
    out += [Route(path, _wrap(path, fn), methods=methods) for path, fn, methods in table]
    return out


def create_app(settings: Settings | None = None, store=None) -> Starlette:
    settings = settings or Settings()
    if store is None:
        from ..store import ModelStore

        store = ModelStore()
    metrics = Metrics()
    manager = Manager(store, parallel=settings.parallel, max_queue=settings.max_queue, max_loaded=settings.max_loaded,
                      memory_budget=settings.memory_budget, metrics=metrics, kv_cache=settings.kv_cache,
                      int8=not settings.exact_weights, in_place=settings.low_memory)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        manager.start()
        try:
            yield
        finally:
            manager.stop()

    middleware = [
        Middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_origin_regex=LOCAL_ORIGINS,
                   allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
                   allow_headers=["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With",
                                  "OpenAI-Beta", "x-stainless-*"]),
        Middleware(APIKeyMiddleware, key=settings.api_key),
    ]

    async def not_found(request, exc):
        return JSONResponse(_error_body(request.url.path, 404, f"{request.method} {request.url.path}: not found"),
                            status_code=404)

    async def not_allowed(request, exc):
        return JSONResponse(_error_body(request.url.path, 405, f"method {request.method} not allowed here"),
                            status_code=405)

    app = Starlette(routes=routes(), middleware=middleware, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_allowed})
    app.state.store, app.state.manager, app.state.metrics, app.state.settings = store, manager, metrics, settings
    manager.default_keep_alive = settings.keep_alive
    return app


def settings_from_args(args) -> Settings:
    from ..cli import weight_flags

    env = os.environ
    int8, in_place = weight_flags(args)
    host, port = parse_host(getattr(args, "host", None) or env.get("WREN_HOST"))
    if getattr(args, "port", None):
        port = args.port
    origins = list(getattr(args, "cors_origin", None) or [])
    origins += [o.strip() for o in env.get("WREN_ORIGINS", "").split(",") if o.strip()]
    kv = getattr(args, "kv_cache", None) or env.get("WREN_KV_CACHE") or None
    if kv is not None:
        kv_cache_types(kv)  # a bad type fails here, before the server starts
    return Settings(host=host, port=port, api_key=getattr(args, "api_key", None) or env.get("WREN_API_KEY") or None,
                    cors_origins=origins,
                    max_queue=getattr(args, "max_queue", None) or int(env.get("WREN_MAX_QUEUE", 512)),
                    parallel=getattr(args, "parallel", None) or int(env.get("WREN_NUM_PARALLEL", 4)),
                    max_loaded=getattr(args, "max_loaded_models", None) or int(env.get("WREN_MAX_LOADED_MODELS", 3)),
                    keep_alive=parse_keep_alive(getattr(args, "keep_alive", None) or env.get("WREN_KEEP_ALIVE")),
                    kv_cache=kv, exact_weights=not int8, low_memory=in_place)


def serve(args) -> int:
    """`wren serve`: run the server until interrupted."""
    import uvicorn

    settings = settings_from_args(args)
    if not is_loopback(settings.host) and not settings.api_key:
        print(f"warning: serving on {settings.host} without an API key: anyone who can reach this address can use "
              "and change your models; set --api-key or WREN_API_KEY", file=sys.stderr)
    app = create_app(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"wren serve: http://{host}:{settings.port} (models in {app.state.store.root})", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=3)
    return 0
