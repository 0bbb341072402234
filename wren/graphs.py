"""The decode step with fixed shapes, captured once in a CUDA graph on a GPU and replayed for every token.

At batch 1 a decode step is hundreds of small kernels, and on a GPU their launch gaps, not the bytes of
the weights, set the speed. `StaticDecoder` runs the step on buffers that never move: the token ids, the
position (`KVCache.step_position`: the cache then hands attention every slot of its full layers, the empty
ones masked), and, for Gemma 4's per-layer embeddings, the table rows, which are gathered on the host
(the table stays memory-mapped there) into pinned memory and copied over asynchronously. Nothing in the
step then depends on the position or waits for the host, so CUDA records it once and replays it.

On the CPU (or with `graph=False`) the same static step runs eagerly; the tests check it there against the
ordinary step.
"""

from __future__ import annotations

import warnings

import torch

from .errors import ContextLengthError


def graphable(model, cache) -> bool:
    """Whether `StaticDecoder` can capture this model's step with this cache: on a GPU, a cache with a
    step position (the dense and compressed caches, not the server's slot cache), no MoE routing (its
    expert loop reads the router's choice on the host)."""
    device = cache.valid.device
    return (device.type == "cuda" and hasattr(cache, "step_position")
            and not getattr(model.config, "enable_moe_block", False))


class StaticDecoder:
    """`decoder(ids)` -> logits [batch, vocab] of the next position, for ids [batch, 1] (on any device).
    The logits are a buffer the next call overwrites: copy them to keep them."""

    def __init__(self, model, cache, graph: bool | None = None):
        self.model, self.cache = model, cache
        self.device = cache.valid.device
        self.graph_wanted = self.device.type == "cuda" if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None
        b = cache.batch
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None
        table = getattr(model, "embed_tokens_per_layer", None)
        self.table = table if getattr(model, "ple_dim", 0) else None
        if self.table is not None:
            dtype = model.norm.weight.dtype
            pinned = self.device.type == "cuda"
            self.rows = torch.zeros(b, 1, self.table.width, dtype=dtype, device=self.device)
            # two host buffers: one is filled while the copy out of the other may still be running
            self.host_rows = [torch.zeros(b, 1, self.table.width, dtype=dtype, pin_memory=pinned) for _ in range(2)]
            self.copied = [None, None]  # the CUDA event after each host buffer's last copy
            self.turn = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.length + 1 > cache.max_len:
            raise ContextLengthError(f"{cache.length + 1} tokens do not fit the context of {cache.max_len}; "
                                     "shorten the prompt or raise num_ctx")
        self.position.fill_(cache.length)
        self.ids.copy_(ids.reshape(self.ids.shape), non_blocking=True)
        if self.table is not None:
            self._copy_rows(ids)
        if not self.graph_wanted:
            return self._forward()
        if self.graph is None:
            length = cache.length
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001 - an op that cannot be captured here: run eagerly
                cache.length = length
                self.graph_wanted = False
                warnings.warn(f"wren: the decode step could not be captured in a CUDA graph, so it runs "
                              f"eagerly ({type(exc).__name__}: {str(exc)[:300]})", RuntimeWarning, stacklevel=2)
                return self._forward()
        self.graph.replay()
        cache.advance(1)
        return self.logits

    def _forward(self) -> torch.Tensor:
        """One step through the model's own forward, the cache in its static mode (advances the cache)."""
        cache = self.cache
        cache.step_position = self.position
        try:
            extra = {"ple_rows": self.rows} if self.table is not None else {}
            self.logits = self.model(self.ids, cache, logits_to_keep=1, **extra)[:, -1]
        finally:
            cache.step_position = None
        return self.logits

    def _capture(self) -> None:
        """Warm up on a side stream (Triton autotunes, lazily built tables are made), then record the step.
        Neither run moves the cache on: both write this position's K/V, which the replay writes again."""
        cache = self.cache
        length = cache.length
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
                cache.length = length
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward()
        cache.length = length
        self.graph = graph

    def _copy_rows(self, ids: torch.Tensor) -> None:
        """The PLE table's rows for `ids`, read on the host, copied into the step's device buffer without
        waiting for the copy."""
        turn = self.turn
        self.turn ^= 1
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # its previous copy has left this host buffer
        host = self.host_rows[turn]
        host.copy_(self.table.lookup(ids.reshape(-1, 1).cpu(), "cpu", host.dtype))
        self.rows.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.copied[turn] = event


def decode_step(model, cache):
    """The function that decodes one token a sequence with `cache`: a `StaticDecoder` where the step can be
    captured (a GPU), else the model's forward. Both return logits [batch, vocab]."""
    if graphable(model, cache):
        return StaticDecoder(model, cache)
    device = cache.valid.device
    return lambda ids: model(ids.to(device), cache, logits_to_keep=1)[:, -1]
