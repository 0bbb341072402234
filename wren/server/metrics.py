"""Counters for GET /metrics, in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import threading
import time
from collections import deque


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_total = 0
        self.generated_total = 0
        self._recent: deque = deque()  # (time, tokens) over the last WINDOW seconds
        self.ttft_count = 0
        self.ttft_sum = 0.0
        self.started = time.time()

    WINDOW = 10.0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            key = (route, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_total += n

    def tokens_generated(self, n: int) -> None:  # called on engine threads
        now = time.monotonic()
        with self._lock:
            self.generated_total += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self.WINDOW:
                self._recent.popleft()

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_count += 1
            self.ttft_sum += seconds

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.WINDOW:
                self._recent.popleft()
            if not self._recent:
                return 0.0
            span = max(now - self._recent[0][0], 1e-3)
            return sum(n for _, n in self._recent) / max(span, min(self.WINDOW, time.time() - self.started))

    def render(self, manager) -> str:
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                label = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

        with self._lock:
            requests = sorted(self.requests.items())
        metric("wren_requests_total", "counter", "HTTP requests by route and status",
               [({"route": r, "status": s}, n) for (r, s), n in requests])
        metric("wren_prompt_tokens_total", "counter", "prompt tokens submitted", [({}, self.prompt_total)])
        metric("wren_generated_tokens_total", "counter", "tokens generated", [({}, self.generated_total)])
        metric("wren_tokens_per_second", "gauge", f"generated tokens per second over the last {self.WINDOW:g}s",
               [({}, round(self.tokens_per_second(), 3))])
        metric("wren_time_to_first_token_seconds", "summary", "time from request to first token", [])
        lines.append(f"wren_time_to_first_token_seconds_sum {self.ttft_sum:.6f}")
        lines.append(f"wren_time_to_first_token_seconds_count {self.ttft_count}")
        loaded = list(manager.loaded.values())
        metric("wren_queue_depth", "gauge", "requests waiting for a free slot",
               [({"model": m.name}, m.engine.queue_depth) for m in loaded] or [({}, 0)])
        metric("wren_active_sequences", "gauge", "sequences being generated",
               [({"model": m.name}, m.engine.active_count) for m in loaded] or [({}, 0)])
        metric("wren_loaded_models", "gauge", "models in memory", [({}, len(loaded))])
        metric("wren_loaded_bytes", "gauge", "bytes of weights and KV cache in memory",
               [({}, sum(m.nbytes for m in loaded))])
        return "\n".join(lines) + "\n"
