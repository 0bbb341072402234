"""Data-free input-channel scales for TurboQuant weights: how loud each input channel of each linear layer
is, read off the weights alone, and the column scaling that this makes optimal.

Why: a random rotation spreads a row's quantization error evenly over its input channels, but the output
error of channel j grows with how loud that input channel is (σ_j). Gemma's residual stream has a few
channels hundreds of times louder than the rest, and its norms' weights partly cancel them, so which
columns matter is far from uniform. Scaling column j by s_j before quantizing (and the input by 1/s_j at
run time) minimises the expected output error (Σ_j a_j s_j²)(Σ_j σ_j²/s_j²) at s_j² ∝ σ_j/√a_j, where a_j
is the column's energy (Cauchy–Schwarz; the AWQ idea with the activation statistics estimated, not
measured).

σ is estimated without any data from what the checkpoint says about its own activations:
* the residual stream starts as the embedding (per-channel energy of the table × sqrt(hidden)²) and every
  block adds a post-norm output whose channel j has energy gain_j² × (that output row's share of the
  projection's energy); layer_scalar rescales it;
* a pre-norm layer's input is the residual divided by its RMS, times the norm's gain;
* o_proj's input channels are V's, down_proj's are gelu(gate)·up's: their loudness follows the rows of
  the projections that make them.
The names are the Gemma 3 / Gemma 4 checkpoint names both model files use; a linear layer this module
does not know gets no scales (s = 1).
"""

from __future__ import annotations

import torch
from torch import nn

MIN_SCALE = 1e-3  # relative to the RMS scale: a silent channel (gain 0) must not divide by zero


def _gain(norm) -> torch.Tensor | None:
    if norm is None or getattr(norm, "weight", None) is None:
        return None
    return (norm.weight.detach().float() + norm.offset).abs()


def _times_gain(energy: torch.Tensor, norm) -> torch.Tensor:
    g = _gain(norm)
    return energy if g is None else energy * g * g


def _row_share(weight: torch.Tensor) -> torch.Tensor:
    """Each output row's share of the projection's energy, mean 1."""
    r = weight.detach().float().pow(2).sum(1)
    return r / r.mean().clamp_min(1e-30)


def _row_loudness(weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """RMS size of each output of `weight` for inputs of per-channel size `sigma`."""
    return (weight.detach().float() * sigma).norm(dim=1)


def _normalised(energy: torch.Tensor) -> torch.Tensor:
    return energy / energy.mean().clamp_min(1e-30)


def input_loudness(model) -> dict[str, torch.Tensor]:
    """{linear module name: σ [in_features]}, the estimated RMS size of each of its input channels."""
    sigma: dict[str, torch.Tensor] = {}
    table = model.embed_tokens
    weight = table.weight if isinstance(table, nn.Embedding) else None
    if weight is None or not hasattr(model, "layers"):
        return sigma
    energy = weight.detach().float().pow(2).mean(0) * model.config.hidden_size
    if getattr(model, "per_layer_model_projection", None) is not None:
        sigma["per_layer_model_projection"] = energy.sqrt()
    attn_sigma: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        attn = layer.self_attn
        s_attn = _times_gain(_normalised(energy), layer.input_layernorm).sqrt()
        attn_sigma[i] = s_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            if getattr(attn, name, None) is not None:
                sigma[p + f"self_attn.{name}"] = s_attn
        source = getattr(getattr(attn, "spec", None), "kv_source", i)
        owner = model.layers[source].self_attn
        v = owner.v_proj if getattr(owner, "v_proj", None) is not None else owner.k_proj
        v_out = _row_loudness(v.weight, attn_sigma[source])
        sigma[p + "self_attn.o_proj"] = v_out.repeat(attn.o_proj.in_features // v_out.numel())
        energy = energy + _times_gain(_row_share(attn.o_proj.weight), layer.post_attention_layernorm)

        mlp = layer.mlp
        s_mlp = _times_gain(_normalised(energy), layer.pre_feedforward_layernorm).sqrt()
        sigma[p + "mlp.gate_proj"] = sigma[p + "mlp.up_proj"] = s_mlp
        sigma[p + "mlp.down_proj"] = _row_loudness(mlp.up_proj.weight, s_mlp) * _row_loudness(mlp.gate_proj.weight,
                                                                                               s_mlp)
        energy = energy + _times_gain(_row_share(mlp.down_proj.weight), layer.post_feedforward_layernorm)

        if getattr(layer, "ple", False):
            s_res = energy.sqrt()
            sigma[p + "per_layer_input_gate"] = s_res
            sigma[p + "per_layer_projection"] = _row_loudness(layer.per_layer_input_gate.weight, s_res)
            energy = energy + _times_gain(_row_share(layer.per_layer_projection.weight), layer.post_per_layer_input_norm)
        scalar = getattr(layer, "layer_scalar", None)
        if scalar is not None:
            energy = energy * scalar.detach().float().pow(2).mean()
    if getattr(model, "lm_head", None) is not None:
        sigma["lm_head"] = _times_gain(_normalised(energy), model.norm).sqrt()
    return sigma


def column_scales(weights: list[torch.Tensor], sigma: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s [in] for the layers that share one input (q/k/v, gate/up): s ∝ (σ/√a)^alpha with a the columns'
    energy summed over those layers (one s for all of them, so their scaled input is rotated once);
    RMS 1, floored at MIN_SCALE."""
    a = sum(w.detach().float().pow(2).sum(0) for w in weights).clamp_min(1e-30)
    s = (sigma.float().clamp_min(0) / a.sqrt()).pow(alpha)
    s = s / s.pow(2).mean().sqrt().clamp_min(1e-30)
    return s.clamp_min(MIN_SCALE)
