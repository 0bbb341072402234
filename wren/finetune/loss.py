"""The training loss without the [T, vocab] logits: final hidden states at the target positions only, then
the LM head and cross-entropy one slice of the vocabulary at a time.

The model's own forward computes everything up to the final norm; `hidden_states` borrows its last step
(`layers.output_logits`: norm, then `head.linear(x)` when the head has one) by standing in for the LM head,
so no architecture code is repeated here. `head_cross_entropy` is one autograd function that computes the
loss and its gradient with respect to the hidden states in two passes over slices of the vocabulary: the
[tokens, vocabulary] logits never exist whole (on Gemma's 262k-token vocabulary they dominate memory).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..quant import linear as tq
from ..quant.linear import TQWeight
from .lora import from_rotated, rotated_rows

SLICE = 16384  # vocabulary rows at a time: the logits temporary is [target tokens, SLICE]


class _Grab(nn.Module):
    """Takes the LM head's place for one forward and keeps its (normed) input."""

    def __init__(self):
        super().__init__()
        self.hidden = None

    def linear(self, x):
        self.hidden = x
        return x[..., :1]


@contextlib.contextmanager
def _head_swapped(model, grab):
    had = "lm_head" in model.__dict__
    saved = model.__dict__.get("lm_head")
    object.__setattr__(model, "lm_head", grab)  # bypasses module registration: nothing is added to the model
    try:
        yield
    finally:
        if had:
            object.__setattr__(model, "lm_head", saved)
        else:
            del model.__dict__["lm_head"]


def lm_head(model) -> nn.Module:
    head = model.embed_tokens if model.lm_head is None else model.lm_head
    if isinstance(head, TQWeight) and head._int8 is None and head.codes.device.type == "cpu" and tq._fast_paths:
        head.int8_levels()  # built once, before training allocates around it
    return head


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, hidden]: the final-normed hidden states, the LM head's input."""
    grab = _Grab()
    with _head_swapped(model, grab):
        model(ids)
    return grab.hidden


class _Head:
    """The LM head as slices of vocabulary rows, in the input space the rows multiply: for a TurboQuant
    head, the rotated space (the input is rotated once, the gradient un-rotated once)."""

    def __init__(self, module, fast: bool):
        self.module, self.tq = module, isinstance(module, TQWeight)
        self.fast = fast and self.tq and module.codes.device.type == "cpu"
        self.rows = module.out_features if self.tq else module.weight.shape[0]
        self.dtype = torch.bfloat16 if self.fast else (torch.float32 if self.tq else module.weight.dtype)

    def prepare(self, h: torch.Tensor) -> torch.Tensor:
        return (self.module.rotate_input(h.float()) if self.tq else h).to(self.dtype)

    def rows_of(self, start: int, stop: int) -> torch.Tensor:
        if self.tq:
            return rotated_rows(self.module, start, stop, self.dtype, self.fast)
        return self.module.weight[start:stop]

    def input_grad(self, g: torch.Tensor) -> torch.Tensor:
        return from_rotated(self.module, g, self.fast) if self.tq else g


class _HeadCE(torch.autograd.Function):
    """Two passes over the vocabulary, a slice of rows at a time: the log-sum-exp of every row (online),
    then softmax minus one-hot times the weight for the gradient. Memory: rows x SLICE logits at most."""

    @staticmethod
    def forward(ctx, h, targets, module, cap):
        head = _Head(module, tq._fast_paths)
        n = h.shape[0]
        with torch.no_grad():
            x = head.prepare(h)
            run_max = torch.full((n,), float("-inf"), device=h.device)
            run_sum = torch.zeros(n, device=h.device)
            target_logit = torch.zeros(n, device=h.device)
            for s in range(0, head.rows, SLICE):
                z = _capped(x @ head.rows_of(s, min(s + SLICE, head.rows)).T, cap)
                new_max = torch.maximum(run_max, z.amax(-1))
                run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(-1)
                run_max = new_max
                inside = (targets >= s) & (targets < s + z.shape[1])
                if inside.any():
                    rows = inside.nonzero()[:, 0]
                    target_logit[rows] = z[rows, targets[rows] - s]
            lse = run_max + torch.log(run_sum)
            total = (lse - target_logit).sum()
            grad = None
            if ctx.needs_input_grad[0]:
                acc = torch.zeros(n, x.shape[1], device=h.device)
                for s in range(0, head.rows, SLICE):
                    w = head.rows_of(s, min(s + SLICE, head.rows))
                    raw = (x @ w.T).float()
                    z = _capped(raw, cap)
                    p = torch.exp(z - lse[:, None])
                    inside = (targets >= s) & (targets < s + z.shape[1])
                    if inside.any():
                        rows = inside.nonzero()[:, 0]
                        p[rows, targets[rows] - s] -= 1
                    if cap:
                        p *= 1 - (z / cap) ** 2  # d(cap·tanh(raw/cap))/draw, with z = cap·tanh(raw/cap)
                    acc += (p.to(w.dtype) @ w).float()
                grad = head.input_grad(acc).to(h.dtype)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def _capped(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    z = z.float()
    return torch.tanh(z / cap) * cap if cap else z


def head_cross_entropy(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the LM head (with the model's final soft-cap) over rows h [N, hidden]."""
    return _HeadCE.apply(h, targets, lm_head(model), model.config.final_logit_softcapping)


def causal_lm_loss(model, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed loss, number of target tokens) of a batch: ids [B, T], targets [B, T], mask [B, T]."""
    h = hidden_states(model, ids)
    n = int(mask.sum())
    return head_cross_entropy(model, h[mask], targets[mask]), n


def reference_loss(model, ids, targets, mask) -> torch.Tensor:
    """The same loss the plain way, from full logits (for tests)."""
    logits = model(ids).float()
    return F.cross_entropy(logits[mask], targets[mask], reduction="sum")


def checkpoint_layers(model, enabled: bool = True) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations. The layer's
    forward is wrapped on the instance, so module names (and saved adapters) do not change."""
    for layer in model.layers:
        if enabled and "forward" not in layer.__dict__:
            inner = layer.forward

            def forward(*args, _inner=inner, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)
            layer.forward = forward
        elif not enabled and "forward" in layer.__dict__:
            del layer.forward
