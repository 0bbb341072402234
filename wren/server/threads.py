"""Torch work of the server that is not decoding runs on a thread of its own, which ends with it.

libgomp (PyTorch's and the compiled kernels' OpenMP) keeps a team of worker threads for every thread that
ever ran a parallel region, for as long as that thread lives. A pooled thread (`asyncio.to_thread`) that
loads a model or builds a token table would keep one beside the engine's: then there are more OpenMP
threads than cores, and libgomp stops spinning between parallel regions and sleeps instead. On 2 cores a
decode step of the default model took 35% longer that way (50 against 80 tokens/s, the same forward). A
thread that ends takes its team with it, and the engine's own thread is left the only one.
"""

from __future__ import annotations

import asyncio
import threading


async def in_own_thread(fn, *args, **kwargs):
    """await fn(*args, **kwargs) run on a new thread that ends when fn returns (or raises)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(outcome, value):
        if not done.done():  # (the awaiting request may have been cancelled meanwhile)
            done.set_exception(value) if outcome == "error" else done.set_result(value)

    def run():
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, "error", exc)
        else:
            loop.call_soon_threadsafe(settle, "ok", value)

    threading.Thread(target=run, name=f"wren-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await done
