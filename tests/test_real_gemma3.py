"""The real Gemma 3 270M GGUF (the default model) against `transformers` loading the same file."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at a temperature of"]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_gguf():
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from transformers import AutoModelForCausalLM

    from wren.weights.load import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers_on_same_gguf(default_model, hf_gguf):
    ids = torch.tensor([default_model.tokenizer.encode(PROMPTS[0] + " and the capital of Spain is Madrid.",
                                                       add_bos=True)])
    with torch.no_grad():
        ours, ref = default_model(ids), hf_gguf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-3


def test_greedy_generation_matches_transformers(default_model, hf_gguf):
    from wren.generation import Generation
    from wren.sampling import Options

    opts = Options(temperature=0, repeat_penalty=1.0, num_predict=NEW_TOKENS)
    same, report = 0, []
    for prompt in PROMPTS:
        ids = default_model.tokenizer.encode(prompt, add_bos=True)
        ours = [t for (t,) in Generation(default_model, [ids], opts, stop_ids=set())]
        with torch.no_grad():
            out = hf_gguf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        theirs = out[0, len(ids):].tolist()
        same += ours == theirs
        report.append((prompt, ours == theirs))
    print("greedy agreement with transformers:", report)
    assert same >= 4, report


def test_default_model_is_the_real_checkpoint(default_model):
    cfg = default_model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("gemma3", 18, 640, 262144)
    assert default_model.tensor_types["Q4_K"] > 0 and default_model.tensor_types["Q8_0"] > 0
