"""Logit parity of wren's Gemma 3 / Gemma 4 code with `transformers` on tiny seeded random models,
from HF folders and from GGUF files, and the KV cache against full forwards."""

from __future__ import annotations

import pytest
import torch

import wren
from conftest import TINY

TOL = 1e-4


def ids_for(seed: int, batch: int = 2, length: int = 24, vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_logits_match_transformers(tiny, name, source):
    hf, folder, gguf_path = tiny[name]
    model = wren.load(folder if source == "hf" else gguf_path)
    ids = ids_for(1)
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert ref.abs().max() > 10, "fixture logits too small for the soft-cap to matter"
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("chunks", [[5] + [1] * 25, [9, 9, 12], [30]])
def test_cached_decoding_equals_full_forward(tiny, name, chunks):
    """Beyond the sliding window (6 here), in any chunking, the cache reproduces a full forward."""
    model = wren.load(tiny[name][1])
    ids = ids_for(2, length=30)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(batch=2, max_len=32)
        parts, start = [], 0
        for n in chunks:
            parts.append(model(ids[:, start:start + n], cache))
            start += n
    assert (torch.cat(parts, 1) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["gemma3", "gemma4-e2b"])
def test_left_padded_batch_equals_single_sequences(tiny, name):
    from wren.generation import Generation
    from wren.sampling import Options

    model = wren.load(tiny[name][1])
    prompts = [[2, 40, 41, 42, 43, 44, 45, 46, 47, 48], [2, 50, 51, 52]]
    opts = Options(temperature=0, repeat_penalty=1.0, num_predict=12)
    batched = [[], []]
    for step in Generation(model, prompts, opts, stop_ids=set()):
        for row, token in enumerate(step):
            batched[row].append(token)
    for row, prompt in enumerate(prompts):
        single = [t for (t,) in Generation(model, [prompt], opts, stop_ids=set())]
        assert batched[row] == single


def test_ple_table_stays_mapped(tiny):
    """The per-layer embedding table is a view of the mapped file, not a resident copy."""
    model = wren.load(tiny["gemma4-e2b"][1])
    table = model.embed_tokens_per_layer
    assert table is not None and table.tensor is not None
    assert table.tensor.data_ptr() not in {p.data_ptr() for p in model.parameters()}
    assert not any(p.shape == table.tensor.shape for p in model.parameters())
    rows = table.lookup(torch.tensor([[3, 5]]), "cpu", torch.float32)
    assert torch.equal(rows[0, 1], table.tensor[5].float())


def test_multimodal_prefix_and_towers(tiny, tmp_path):
    """A multimodal checkpoint's `model.language_model.` weights load; vision tensors are skipped."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    hf, folder, _ = tiny["gemma4-e4b"]
    for f in folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    state = load_file(folder / "model.safetensors")
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    renamed["model.vision_tower.encoder.weight"] = torch.zeros(2, 2)
    save_file(renamed, tmp_path / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": cfg}))
    model = wren.load(tmp_path)
    ids = ids_for(3)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= TOL
    assert any("vision" in n for n in model.notes)


def test_raw_global_config_keys_resolve_like_per_layer_config():
    from wren.config import FULL, Gemma4Config

    raw = Gemma4Config.from_dict({"num_hidden_layers": 4, "layer_types": ["sliding_attention"] * 3 + [FULL],
                                  "head_dim": 16, "global_head_dim": 32, "num_key_value_heads": 2,
                                  "attention_k_eq_v": True, "num_global_key_value_heads": 1})
    spec = raw.layer_specs()[3]
    assert (spec.head_dim, spec.num_kv_heads, spec.k_eq_v, spec.rope_dims) == (32, 1, True, 8)
    assert raw.layer_specs()[0].head_dim == 16


def test_bfloat16_runs_close_to_float32(tiny):
    model32 = wren.load(tiny["gemma4-e2b"][2])
    model16 = wren.load(tiny["gemma4-e2b"][2], dtype=torch.bfloat16)
    ids = ids_for(4)
    with torch.no_grad():
        a, b = model32(ids), model16(ids)
    assert b.dtype == torch.bfloat16
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b.float()).abs().max() < 3.0  # bf16 keeps ~3 significant digits of logits up to 30
