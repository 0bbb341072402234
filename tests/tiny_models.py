"""Tiny seeded random Gemma models built with `transformers`, the logit oracle for wren's own code.

Every parameter is randomised, norm weights and `layer_scalar` included (the default init of ones hides
bugs), and the embedding is scaled so logits reach ~10-30 where the final soft-cap matters.
"""

from __future__ import annotations

import torch

SL, FU = "sliding_attention", "full_attention"

GEMMA4_SHAPES = {
    # PLE + KV sharing + double-wide MLP, mixed sliding/full layers (like E2B)
    "e2b": dict(num_hidden_layers=7, layer_types=[SL, SL, FU, SL, SL, SL, FU], num_kv_shared_layers=3,
                use_double_wide_mlp=True, hidden_size_per_layer_input=8, num_key_value_heads=1),
    # PLE, no double-wide MLP, more KV heads (like E4B)
    "e4b": dict(num_hidden_layers=6, layer_types=[SL, SL, FU, SL, SL, FU], num_kv_shared_layers=2,
                hidden_size_per_layer_input=8, num_key_value_heads=2),
    # MoE + K=V full layers + fewer global KV heads, no PLE (like 26B-A4B)
    "26b": dict(num_hidden_layers=5, layer_types=[SL, SL, FU, SL, FU], hidden_size_per_layer_input=0,
                num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1,
                enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24),
}


def randomize_(model: torch.nn.Module, seed: int, embed_std: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or not p.dtype.is_floating_point or name.endswith("embed_scale"):
                continue
            if name.endswith("layer_scalar"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "norm" in name or name.endswith("router.scale") or name.endswith("per_expert_scale"):
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * embed_std)
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def gemma4_hf(shape: str, seed: int = 0, vocab: int = 384, sliding_window: int = 6, head_dim: int = 16, **overrides):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    fields = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=head_dim,
        global_head_dim=2 * head_dim, sliding_window=sliding_window, vocab_size_per_layer_input=vocab,
        final_logit_softcapping=30.0, max_position_embeddings=256, attn_implementation="eager")
    cfg = Gemma4TextConfig(**{**fields, **GEMMA4_SHAPES[shape], **overrides})
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(cfg).eval()
    randomize_(model, seed, embed_std=1.5)
    return model


def gemma3_hf(seed: int = 0, vocab: int = 384, sliding_window: int = 6, intermediate: int = 96, head_dim: int = 16,
              hidden: int = 64):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
        max_position_embeddings=256, attn_implementation="eager",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}})
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    randomize_(model, seed, embed_std=1.5)
    return model
