"""Sampler: Ollama's options and defaults, seeded reproducibility, the top-k / top-p / min-p masks, penalties."""

from __future__ import annotations

import pytest
import torch

from wren.errors import BadOptionError
from wren.sampling import Options, apply_penalties, filter_logits, make_sampler


def test_ollama_defaults():
    o = Options()
    assert (o.temperature, o.top_k, o.top_p, o.min_p, o.repeat_penalty, o.repeat_last_n) == (0.8, 40, 0.9, 0.0, 1.1, 64)


def test_greedy_is_exact_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    sample = make_sampler(Options(temperature=0, repeat_penalty=1.0))
    assert sample(logits, [1, 2, 3]) == int(torch.argmax(logits))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    draw = lambda seed: [make_sampler(Options(seed=seed, temperature=1.5, top_k=0, top_p=1.0))(logits, [])
                         for _ in range(1)]
    a = make_sampler(Options(seed=7, temperature=1.5, top_k=0, top_p=1.0))
    b = make_sampler(Options(seed=7, temperature=1.5, top_k=0, top_p=1.0))
    seq_a = [a(logits, []) for _ in range(50)]
    seq_b = [b(logits, []) for _ in range(50)]
    assert seq_a == seq_b
    c = make_sampler(Options(seed=8, temperature=1.5, top_k=0, top_p=1.0))
    assert [c(logits, []) for _ in range(50)] != seq_a
    assert draw(3) == draw(3)


def test_top_k_keeps_exactly_k():
    logits = torch.arange(100.0)
    kept = torch.isfinite(filter_logits(logits, Options(top_k=5, top_p=1.0)))
    assert kept.nonzero().flatten().tolist() == [95, 96, 97, 98, 99]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, Options(top_k=0, top_p=0.8)))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, Options(top_k=0, top_p=0.81)))
    assert kept.tolist() == [True, True, True, False]


def test_min_p_drops_tokens_below_fraction_of_best():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    kept = torch.isfinite(filter_logits(probs.log(), Options(top_k=0, top_p=1.0, min_p=0.2)))
    assert kept.tolist() == [True, True, False, False]


def test_sampling_only_draws_allowed_tokens():
    logits = torch.arange(50.0) / 10
    sample = make_sampler(Options(seed=0, temperature=2.0, top_k=3, top_p=1.0))
    assert {sample(logits, []) for _ in range(200)} <= {47, 48, 49}


def test_repeat_presence_frequency_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits, [0, 1, 1], Options(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.1))
    assert out.tolist() == pytest.approx([2.0 / 2 - 0.1 - 0.5, -2.0 * 2 - 0.2 - 0.5, 1.0, 0.5])
    window = apply_penalties(logits, [0, 2], Options(repeat_penalty=2.0, repeat_last_n=1))
    assert window.tolist() == pytest.approx([2.0, -2.0, 0.5, 0.5])


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -3},
                                 {"num_ctx": 0}, {"seed": "abc"}, {"top_k": 2.5}, {"temperature": True},
                                 {"stop": 5}, {"bogus": 1}])
def test_bad_options_raise(bad):
    with pytest.raises(BadOptionError):
        Options.from_dict(bad)


def test_options_coerce_strings_and_lists():
    o = Options.from_dict({"temperature": "0.5", "top_k": 10.0, "stop": "END"})
    assert (o.temperature, o.top_k, o.stop) == (0.5, 10, ["END"])
