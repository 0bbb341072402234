"""Gemma 3 text decoder: (1 + w) RMSNorms, query_pre_attn_scalar, local/global RoPE bases, sliding window.

Module names follow the Hugging Face checkpoint (without the leading `model.`), so weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import decode_plan
from ..cache import KVCache
from ..config import SLIDING, Gemma3Config, LayerSpec
from ..quant.linear import linears
from ..residual import Residual, value_of
from .layers import (GatedMLP, RMSNorm, attend_project, embed, norm_rope, output_logits, positions, rope_cos_sin,
                     rope_inv_freq, uninitialized_embedding)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, spec: LayerSpec, index: int):
        super().__init__()
        self.spec, self.index = spec, index
        self.window = cfg.sliding_window if spec.kind == SLIDING else None
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        d, h, hkv = spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, offset=1.0)

    def forward(self, x, cos, sin, pos, cache: KVCache | None, norm: RMSNorm | None = None):
        """Attention of norm(x) (x itself without `norm`; with it, on CUDA, the norm runs in the rotation)."""
        b, t, _ = x.shape
        d = self.spec.head_dim
        q, k, v = linears(x, (self.q_proj, self.k_proj, self.v_proj), norm)
        q = norm_rope(self.q_norm, q.view(b, t, -1, d), cos, sin).transpose(1, 2)
        k = norm_rope(self.k_norm, k.view(b, t, -1, d), cos, sin).transpose(1, 2)
        v = v.view(b, t, -1, d).transpose(1, 2)
        kv = (k, v, pos[0], None) if cache is None else cache.update(self.index, k, v, pos[0])
        return attend_project(self.o_proj, q, kv, pos, self.window, self.scale, self.softcap)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, spec: LayerSpec, index: int):
        super().__init__()
        eps, hidden = cfg.rms_norm_eps, cfg.hidden_size
        self.self_attn = Attention(cfg, spec, index)
        self.mlp = GatedMLP(hidden, spec.mlp_width)
        self.input_layernorm = RMSNorm(hidden, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset=1.0)

    def forward(self, x, cos, sin, pos, cache, defer: bool = False):
        """The layer on x, the residual stream (or the Residual the layer before left unfinished); with
        `defer` the stream out is left a Residual too, for the next layer's first rotation to finish (on
        CUDA at batch 1: in the same kernel)."""
        h = self.self_attn(x, cos, sin, pos, cache, self.input_layernorm)
        x = Residual(h, value_of(x), self.post_attention_layernorm)
        h = self.mlp(x, self.pre_feedforward_layernorm)
        out = Residual(h, x.value(), self.post_feedforward_layernorm)
        return out if defer else out.value()


class Gemma3(nn.Module):
    family = "gemma3"

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.config = cfg
        self.specs = cfg.layer_specs()
        self.embed_tokens = uninitialized_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, s, i) for i, s in enumerate(self.specs))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.embed_tokens_per_layer = None
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)compute the RoPE frequencies; also called after loading on the meta device."""
        for kind in {s.kind for s in self.specs}:
            s = next(s for s in self.specs if s.kind == kind)
            self.register_buffer(f"inv_freq_{kind}", rope_inv_freq(s.head_dim, s.rope_dims, s.rope_theta,
                                                                   s.rope_factor), persistent=False)

    def make_cache(self, batch: int = 1, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        return KVCache.for_model(self, batch, max_len, dtype, device)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        x = embed(self, ids)
        pos = positions(ids, cache)
        rope = {kind: rope_cos_sin(pos, getattr(self, f"inv_freq_{kind}"), x.dtype)
                for kind in {s.kind for s in self.specs}}
        plan = decode_plan.plan_for(self, cache, ids)
        if plan is not None:  # one decoded token (a row): one compiled call a layer
            x = plan.run(x, rope, pos)
        else:
            defer = not torch.is_grad_enabled()  # (training keeps each layer's work inside its checkpoint)
            for spec, layer in zip(self.specs, self.layers):
                x = layer(x, *rope[spec.kind], pos, cache, defer)
            x = value_of(x)
        if cache is not None:
            cache.advance(ids.shape[1])
        return output_logits(self, x, logits_to_keep)
