"""`wren serve`: an Ollama- and OpenAI-compatible HTTP server (see app.py for the layout)."""

from __future__ import annotations

import os


def serve(args) -> int:
    # Torch runs on worker threads beside the event loop. OpenMP workers that spin while idle (the default)
    # starve the loop thread on a small machine -- streaming ran 10-25x slower -- so let them sleep. This must
    # be set before torch is first imported, hence here and not in app.py.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .app import serve as run

    return run(args)
