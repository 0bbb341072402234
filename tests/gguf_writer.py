"""Write a Hugging Face Gemma model as a GGUF file the way llama.cpp's converter does (names, metadata,
Gemma 3's 1 + w norms), with `gguf`'s own writer: an independent check of wren's GGUF reader."""

from __future__ import annotations

import gguf
import numpy as np

BLOCK_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight", "layer_scalar": "layer_output_scale.weight",
    "per_layer_input_gate.weight": "inp_gate.weight", "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight", "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}


def tiny_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, the 256 byte tokens, then a few pieces."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|turn>", "<turn|>"]
    types = [3, 3, 3, 2, 3, 3, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["▁", "e", "t", "a", "o", "n", "▁t", "▁a", "he", "▁the", "in", "er", "▁s", "re", "on", "▁w"]
    pieces += [chr(c) for c in range(ord("b"), ord("z") + 1) if chr(c) not in pieces]
    pieces += [f"▁{chr(c)}" for c in range(ord("b"), ord("z") + 1) if f"▁{chr(c)}" not in pieces]
    n_pieces = size - len(tokens)
    extra = [f"▁w{i}" for i in range(max(0, n_pieces - len(pieces)))]
    tokens += (pieces + extra)[:n_pieces]
    types += [1] * n_pieces
    scores = [0.0] * (size - n_pieces) + [-float(i) for i in range(n_pieces)]
    return tokens, scores, types


def write_gguf(hf_model, path, arch: str, tensor_type=gguf.GGMLQuantizationType.F32, tied: bool = False) -> None:
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    if arch == "gemma3":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        if rope["full_attention"].get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["full_attention"]["factor"])
    else:
        _gemma4_metadata(w, hf_model)
    tokens, scores, types = tiny_vocab(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    for name, t in hf_model.state_dict().items():
        gname = _gguf_name(name)
        if gname is None or (tied and gname == "output.weight"):  # tied: the head is token_embd, as in real files
            continue
        data = t.detach().float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp stores Gemma 3 norms as 1 + w
        qtype = tensor_type if data.ndim == 2 and "norm" not in name else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
    if arch == "gemma4":
        w.add_tensor("rope_freqs.weight", _rope_freqs(hf_model))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _full_attention(hf_model):
    """(head_dim, kv heads) of the first full-attention layer."""
    cfg = hf_model.config
    attn = hf_model.model.layers[cfg.layer_types.index("full_attention")].self_attn
    return attn.head_dim, attn.k_proj.weight.shape[0] // attn.head_dim


def _gemma4_metadata(w, hf_model) -> None:
    cfg = hf_model.config
    sliding = hf_model.model.layers[cfg.layer_types.index("sliding_attention")].self_attn
    head_swa, kv_swa = sliding.head_dim, sliding.k_proj.weight.shape[0] // sliding.head_dim
    n, shared = cfg.num_hidden_layers, cfg.num_kv_shared_layers
    swa = [t == "sliding_attention" for t in cfg.layer_types]
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input or 0)
    w.add_sliding_window_pattern(swa)
    head_full, kv_full = _full_attention(hf_model)
    w.add_key_length(head_full)
    w.add_value_length(head_full)
    w.add_key_length_swa(head_swa)
    w.add_value_length_swa(head_swa)
    w.add_rope_freq_base_swa(cfg.rope_parameters["sliding_attention"]["rope_theta"])
    ff = [cfg.intermediate_size * (2 if cfg.use_double_wide_mlp and i >= n - shared else 1) for i in range(n)]
    w.add_feed_forward_length(ff if cfg.use_double_wide_mlp else cfg.intermediate_size)
    if kv_full != kv_swa:
        w.add_head_count_kv([kv_swa if s else kv_full for s in swa])
    else:
        w.add_head_count_kv(kv_swa)
    if cfg.enable_moe_block:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def _rope_freqs(hf_model) -> np.ndarray:
    """1 for each rotated frequency of the full layers, 1e30 (no rotation) for the rest, as llama.cpp."""
    full = hf_model.config.rope_parameters["full_attention"]
    head_full, _ = _full_attention(hf_model)
    n_rot = int(head_full * full.get("partial_rotary_factor", 1.0) / 2)
    return np.array([1.0] * n_rot + [1e30] * (head_full // 2 - n_rot), dtype=np.float32)


def _gguf_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    if name.startswith("model.layers."):
        idx, rest = name[len("model.layers."):].split(".", 1)
        return f"blk.{idx}.{BLOCK_NAMES[rest]}" if rest in BLOCK_NAMES else None
    return None


def save_hf(hf_model, folder) -> None:
    """save_pretrained plus a tokenizer.json for the tiny vocabulary."""
    from wren.tokenizer import Tokenizer

    hf_model.save_pretrained(folder)
    tokens, scores, types = tiny_vocab(hf_model.config.vocab_size)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_space_prefix": False}
    Tokenizer.from_gguf_metadata(meta).save(f"{folder}/tokenizer.json")

