"""Gemma 4 text decoder: per-layer embeddings (PLE), KV sharing, K=V full layers, MoE, proportional RoPE.

Module names follow the Hugging Face checkpoint (without the leading `model.`), so weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import decode_plan, triton_ops
from ..cache import KVCache
from ..config import SLIDING, Gemma4Config, LayerSpec
from ..quant.linear import linears
from ..residual import Residual, value_of
from ..triton_ops import guarded
from .layers import (GatedMLP, RMSNorm, attend_project, embed, embed_scale, gelu_tanh, of_gated, output_logits,
                     norm_rope, positions, rope_cos_sin, rope_inv_freq, uninitialized_embedding)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma4Config, spec: LayerSpec, index: int):
        super().__init__()
        self.spec, self.index = spec, index
        self.owns_kv = spec.kv_source == index
        self.window = cfg.sliding_window if spec.kind == SLIDING else None
        d, h, hkv = spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        if self.owns_kv:
            self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
            self.v_proj = None if spec.k_eq_v else nn.Linear(cfg.hidden_size, hkv * d, bias=False)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x, cos, sin, pos, cache: KVCache | None, shared: dict, norm: RMSNorm | None = None):
        """Attention of norm(x) (x itself without `norm`; with it, on CUDA, the norm runs in the rotation)."""
        b, t, _ = x.shape
        d = self.spec.head_dim
        projections = (self.q_proj,) if not self.owns_kv else tuple(
            p for p in (self.q_proj, self.k_proj, self.v_proj) if p is not None)  # v is k where k_eq_v
        q, *kv_raw = (y.view(b, t, -1, d) for y in linears(x, projections, norm))
        if self.owns_kv:
            target = cache.write_target(self.index, kv_raw[0], pos[0]) if cache is not None else None
            q, k, v, written = self._head_norms(q, kv_raw[0], kv_raw[-1], cos, sin, target)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is None:
                kv = (k, v, pos[0], None)
            else:
                kv = cache.written(self.index, pos[0]) if written else cache.update(self.index, k, v, pos[0])
            shared[self.index] = kv
        else:
            q = norm_rope(self.q_norm, q, cos, sin).transpose(1, 2)
            kv = shared[self.spec.kv_source]
        return attend_project(self.o_proj, q, kv, pos, self.window, scale=1.0)

    def _head_norms(self, q, k_raw, v_raw, cos, sin, target):
        """q and k normed and RoPE'd, v normed (weightless): one kernel on CUDA, which also writes k and v
        into the cache where it gives a `target` (then the last item, written, is True); else one pass each."""
        def each():
            return (norm_rope(self.q_norm, q, cos, sin), norm_rope(self.k_norm, k_raw, cos, sin),
                    self.v_norm(v_raw), False)

        if triton_ops.norms_qkv(q, k_raw, v_raw, self.q_norm.weight):
            return guarded("qkv_norms", lambda: (*triton_ops.qkv_norms(q, k_raw, v_raw, self.q_norm, self.k_norm,
                                                                       cos, sin, target), target is not None), each)
        return each()


class Router(nn.Module):
    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x):
        h = self.norm(x) * self.scale * (x.shape[-1] ** -0.5)
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


class Experts(nn.Module):
    """Expert weights stored as [E, 2I, H] (gate then up) and [E, H, I], as the checkpoint has them."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x, weights, experts):
        out = torch.zeros_like(x)
        for e in torch.unique(experts).tolist():
            token, slot = torch.where(experts == e)
            gate, up = (x[token] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            y = (gelu_tanh(gate) * up) @ self.down_proj[e].T
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma4Config, spec: LayerSpec, index: int):
        super().__init__()
        eps, hidden = cfg.rms_norm_eps, cfg.hidden_size
        self.self_attn = Attention(cfg, spec, index)
        self.mlp = GatedMLP(hidden, spec.mlp_width)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.ple = bool(cfg.hidden_size_per_layer_input)
        if self.ple:
            self.per_layer_input_gate = nn.Linear(hidden, cfg.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(cfg.hidden_size_per_layer_input, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)

    def forward(self, x, per_layer_input, cos, sin, pos, cache, shared, defer: bool = False):
        """The layer on x, the residual stream (or the Residual the layer before left unfinished); with
        `defer` the stream out is left a Residual too, for the next layer's first rotation to finish (on
        CUDA at batch 1: in the same kernel)."""
        h = self.self_attn(x, cos, sin, pos, cache, shared, norm=self.input_layernorm)
        x = Residual(h, value_of(x), self.post_attention_layernorm)
        h = self.mlp(x, norm=self.pre_feedforward_layernorm)
        x = x.value()
        if self.moe:
            # The experts run beside the dense MLP, routed on the same pre-MLP residual.
            flat = x.reshape(-1, x.shape[-1])
            weights, experts = self.router(flat)
            moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, experts).reshape(x.shape)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(moe)
        last_norm = self.post_feedforward_layernorm
        if self.ple:
            x = Residual(h, x, self.post_feedforward_layernorm)
            gate = linears(x, (self.per_layer_input_gate,))[0]
            h = of_gated(self.per_layer_projection, gate, per_layer_input)
            x, last_norm = x.value(), self.post_per_layer_input_norm
        out = Residual(h, x, last_norm, scale=self.layer_scalar)  # (the layer scalar rides on the last norm)
        return out if defer else out.value()


class Gemma4(nn.Module):
    family = "gemma4"

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.config = cfg
        self.specs = cfg.layer_specs()
        self.embed_tokens = uninitialized_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, s, i) for i, s in enumerate(self.specs))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ple_dim = cfg.hidden_size_per_layer_input
        # The PLE table is a lookup, not a matmul: it stays memory-mapped off the accelerator (a RowTable,
        # set by the loader) and only the rows a prompt touches are read.
        self.embed_tokens_per_layer = None
        if self.ple_dim:
            n = cfg.num_hidden_layers * self.ple_dim
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, n, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.ple_dim, cfg.rms_norm_eps)
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)compute the RoPE frequencies; also called after loading on the meta device."""
        for i, s in enumerate(self.specs):
            self.register_buffer(f"inv_freq_{i}", rope_inv_freq(s.head_dim, s.rope_dims, s.rope_theta, s.rope_factor),
                                 persistent=False)

    def make_cache(self, batch: int = 1, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        return KVCache.for_model(self, batch, max_len, dtype, device)

    def per_layer_inputs(self, ids: torch.Tensor, embeds: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The PLE inputs of every layer; `rows` are the table's rows for `ids` when the caller looked them
        up already (graphs.StaticDecoder gathers them on the host and copies them over asynchronously)."""
        b, t = ids.shape
        n, p = self.config.num_hidden_layers, self.ple_dim
        proj = self.per_layer_model_projection(embeds) * (self.config.hidden_size ** -0.5)
        proj = self.per_layer_projection_norm(proj.reshape(b, t, n, p))
        if rows is None:
            rows = self.embed_tokens_per_layer.lookup(ids, embeds.device, embeds.dtype)
        rows = rows * embed_scale(p, rows.dtype)
        return (proj + rows.reshape(b, t, n, p)) * (2.0 ** -0.5)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, logits_to_keep: int = 0,
                ple_rows: torch.Tensor | None = None) -> torch.Tensor:
        x = embed(self, ids)
        ple = self.per_layer_inputs(ids, x, ple_rows) if self.ple_dim else None
        pos = positions(ids, cache)
        rope = {}
        for i, spec in enumerate(self.specs):
            key = decode_plan.rope_key(self, spec)
            if key not in rope:
                rope[key] = rope_cos_sin(pos, getattr(self, f"inv_freq_{i}"), x.dtype)
        plan = decode_plan.plan_for(self, cache, ids)
        if plan is not None:  # one decoded token (a row): one compiled call a layer
            x = plan.run(x, rope, pos, ple)
        else:
            shared: dict = {}
            defer = not torch.is_grad_enabled()  # (training keeps each layer's work inside its checkpoint)
            for i, layer in enumerate(self.layers):
                cos, sin = rope[decode_plan.rope_key(self, self.specs[i])]
                x = layer(x, ple[:, :, i] if ple is not None else None, cos, sin, pos, cache, shared, defer)
            x = value_of(x)
        if cache is not None:
            cache.advance(ids.shape[1])
        return output_logits(self, x, logits_to_keep)
