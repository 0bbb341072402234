"""`wren serve`: an Ollama- and OpenAI-compatible HTTP server (see app.py for the layout)."""

from __future__ import annotations

import os


def serve(args) -> int:
    # Torch runs on worker threads beside the event loop. OpenMP workers that spin while idle (the default)
    # starve the loop thread on a small machine -- streaming ran 10-25x slower -- so let them sleep. But not
    # at once: a decode step is ~100 parallel regions a few microseconds apart, and a worker that sleeps
    # between them is woken ~100 times a token (the default model served one client at 49 tokens/s, against
    # 80 in-process). A short spin (~0.3 ms) first: 80 tokens/s served, and 115 / 206 for 4 / 16 clients
    # instead of 76 / 145 (bench/serve.py, 2 cores). Both must be set before torch is first imported, hence
    # here and not in app.py. (threads.py keeps the engine's the only OpenMP team, which they assume.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
    from .app import serve as run

    return run(args)
