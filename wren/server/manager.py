"""Loaded models: load on demand from the store, keep_alive expiry, several models within a memory budget.

Each loaded model owns one Engine (its batching worker). Loading runs in a thread of its own; a per-name lock
keeps two requests from loading the same model twice. Past the budget (bytes or model count), the least
recently used idle model is unloaded first.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field

from ..errors import BadOptionError, WrenError
from ..kv import resolve_types
from .engine import Engine
from .threads import in_own_thread

DEFAULT_KEEP_ALIVE = 300.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value, default: float = DEFAULT_KEEP_ALIVE) -> float | None:
    """Seconds to keep a model loaded after a request; None = forever (a negative value), 0 = unload now.
    Accepts numbers (seconds) and Go-style durations ("5m", "1h30m", "10s", "-1")."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise BadOptionError(f"keep_alive must be a duration like \"5m\" or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = re.fullmatch(r"-?(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+", text)
            if not parts:
                raise BadOptionError(f"keep_alive {value!r} is not a duration like \"5m\", \"1h\" or \"-1\"") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text))
            seconds = -seconds if text.startswith("-") else seconds
    else:
        raise BadOptionError(f"keep_alive must be a duration like \"5m\" or a number of seconds, got {value!r}")
    return None if seconds < 0 else seconds


@dataclass
class Loaded:
    name: str
    resolved: object  # store.ResolvedModel
    model: object
    engine: Engine
    load_seconds: float
    weight_bytes: int
    expires_at: float | None = None  # time.time(); None: never
    keep_alive: float | None = DEFAULT_KEEP_ALIVE
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.weight_bytes + self.engine.nbytes()

    @property
    def busy(self) -> bool:
        return self.users > 0 or self.engine.busy


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Manager:
    def __init__(self, store, *, parallel: int = 4, max_queue: int = 512, max_loaded: int = 3,
                 memory_budget: int | None = None, default_ctx: int = 4096, metrics=None, kv_cache: str | None = None,
                 int8: bool = True, in_place: bool = False):
        self.store, self.parallel, self.max_queue = store, parallel, max_queue
        self.kv_cache = kv_cache  # the server's default cache type (--kv-cache); a model's PARAMETER wins
        self.int8, self.in_place = int8, in_place  # how GGUF weights run on the CPU (wren.load's int8, in_place)
        self.max_loaded = max(1, max_loaded)
        self.budget = memory_budget or int(_total_memory() * 0.75)
        self.default_ctx, self.metrics = default_ctx, metrics
        self.default_keep_alive: float | None = DEFAULT_KEEP_ALIVE
        self.loaded: dict[str, Loaded] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task | None = None

    async def resolve(self, name: str):
        if not isinstance(name, str) or not name:
            raise BadOptionError("the request needs a model name")
        return await asyncio.to_thread(self.store.resolve, name)

    async def acquire(self, name: str, keep_alive=None, num_ctx: int | None = None) -> Loaded:
        """The loaded model for `name` (loading it if need be), marked in use until `release`."""
        resolved = await self.resolve(name)
        lock = self._locks.setdefault(resolved.digest, asyncio.Lock())
        async with lock:
            loaded = self.loaded.get(resolved.digest)
            if loaded is None:
                loaded = await self._load(resolved, num_ctx)
            loaded.users += 1
            loaded.last_used = time.monotonic()
            loaded.keep_alive = parse_keep_alive(keep_alive, self.default_keep_alive)
            loaded.expires_at = None
        return loaded

    def release(self, loaded: Loaded) -> None:
        loaded.users -= 1
        loaded.last_used = time.monotonic()
        if loaded.users == 0:
            self._schedule(loaded)

    def _schedule(self, loaded: Loaded) -> None:
        if loaded.keep_alive is None:
            loaded.expires_at = None
        else:
            loaded.expires_at = time.time() + loaded.keep_alive
            if loaded.keep_alive == 0:
                self._expire()

    async def _load(self, resolved, num_ctx: int | None) -> Loaded:
        import wren

        params = resolved.parameters or {}
        ctx = int(num_ctx or params.get("num_ctx") or self.default_ctx)
        t0 = time.perf_counter()
        model = await in_own_thread(wren.load, resolved.model_path, int8=self.int8,  # (threads.py says why)
                                    in_place=self.in_place)
        if model.tokenizer is None:
            raise WrenError(f"{resolved.name} has no tokenizer; it cannot be served")
        ctx = max(1, min(ctx, model.config.max_position_embeddings))
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        weights += sum(b.numel() * b.element_size() for b in model.buffers())
        self._make_room(weights)
        model.kv_cache = params.get("kv_cache") or self.kv_cache
        kv_types = resolve_types(model, model.kv_cache)
        engine = await in_own_thread(Engine, model, slots=self.parallel, ctx=ctx, max_queue=self.max_queue,
                                         metrics=self.metrics, name=resolved.name, kv_types=kv_types)
        loaded = Loaded(resolved.name, resolved, model, engine, time.perf_counter() - t0, weights)
        self.loaded[resolved.digest] = loaded
        return loaded

    def _make_room(self, incoming: int) -> None:
        while self.loaded:
            total = sum(m.nbytes for m in self.loaded.values()) + incoming
            if len(self.loaded) < self.max_loaded and total <= self.budget:
                return
            idle = [m for m in self.loaded.values() if not m.busy]
            if not idle:
                return  # everything is in use: go over rather than fail a request
            self.unload(min(idle, key=lambda m: m.last_used))

    def unload(self, loaded: Loaded) -> None:
        for digest, m in list(self.loaded.items()):
            if m is loaded:
                del self.loaded[digest]
        loaded.engine.close()

    async def unload_name(self, name: str) -> bool:
        resolved = await self.resolve(name)
        loaded = self.loaded.get(resolved.digest)
        if loaded is None:
            return False
        loaded.keep_alive, loaded.expires_at = 0, time.time()
        self._expire()
        return True

    def _expire(self) -> None:
        now = time.time()
        for m in list(self.loaded.values()):
            if m.expires_at is not None and m.expires_at <= now and not m.busy:
                self.unload(m)

    async def run_reaper(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self._expire()

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self.run_reaper())

    def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for m in list(self.loaded.values()):
            self.unload(m)

    def forget(self, name_digest: str) -> None:
        """Unload a model whose manifest was deleted (if idle)."""
        m = self.loaded.get(name_digest)
        if m is not None and not m.busy:
            self.unload(m)
