"""Sampler: Ollama's options and defaults, seeded reproducibility, the top-k / top-p / min-p masks, penalties."""

from __future__ import annotations

import pytest
import torch

from wren import native
from wren.errors import BadOptionError
from wren.sampling import Options, apply_penalties, draw, filter_logits, make_sampler, top_k


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


# (the compiled search for n >= 4096 and k <= 1024 where the kernels run, with fewer blocks than k at 4100)
@pytest.mark.parametrize("n,k", [(262144, 40), (262147, 40), (262144, 1), (100000, 64), (5000, 40), (300, 40),
                                 (262144, 1024), (4100, 1000)])
def test_top_k_of_a_long_vector_is_torch_topk(n, k):
    """sampling.top_k searches only the blocks whose maxima can hold the k largest: the same values and,
    where they are distinct, the same ids as torch.topk; ties (few distinct values) keep the values."""
    g = torch.Generator().manual_seed(n + k)
    for x in (torch.randn(n, generator=g) * 3, torch.randint(0, 50, (n,), generator=g).float()):
        compiled = native.top_k(x, k)
        assert (compiled is not None) == native.available()
        want_values, want_ids = torch.topk(x, k)
        for values, ids in [top_k(x, k)] + ([compiled] if compiled is not None else []):
            assert torch.equal(values, want_values)
            assert torch.equal(x[ids], values) and ids.unique().numel() == k
            if x.unique().numel() == n:
                assert torch.equal(ids, want_ids)


def test_top_k_of_a_masked_vector_is_torch_topk():
    """Fewer values above -inf than k (a constrained sampler's mask) leaves the compiled search: torch.topk's
    answer, -inf entries included."""
    x = torch.full((20000,), float("-inf"))
    x[[5, 700, 19999]] = torch.tensor([1.0, 3.0, 2.0])
    assert native.top_k(x, 40) is None
    values, ids = top_k(x, 40)
    assert values[:3].tolist() == [3.0, 2.0, 1.0] and ids[:3].tolist() == [700, 19999, 5]
    assert torch.isinf(values[3:]).all() and ids.unique().numel() == 40


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_penalties_on_the_few_values_equal_penalties_on_a_copy(temperature):
    """The sampler writes the penalties into the few values it looks at (top_k of the others and the
    penalized ids), not into a copy of all 262k logits: the same tokens kept (and the same greedy pick,
    first of equals), also when the top logits are the penalized ones and when they are tied."""
    from wren.sampling import candidates, penalties

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(262144, generator=g)
    top = torch.topk(logits, 30).indices.tolist()
    for history, opts in (([*top[:20], 5, 5, 9], Options(repeat_penalty=1.3, frequency_penalty=0.2)),
                          (top[::3], Options(repeat_penalty=1.1, presence_penalty=-0.5)),  # raised, not lowered
                          ([1, 2, 3], Options(repeat_penalty=1.1))):
        opts.temperature = temperature
        full = apply_penalties(logits, history, opts)
        if temperature == 0:
            assert make_sampler(opts)(logits, history) == int(torch.argmax(full))
            continue
        kept, ids = candidates(logits, opts, penalties(logits, history, opts))
        want_kept, want_ids = candidates(full, opts)
        assert torch.equal(ids, want_ids) and torch.equal(kept, want_kept)
    if temperature == 0:  # a penalized token raised to tie with the top one: the first of the two wins
        for raised in (100, 200000):
            x = logits * 0.1
            x[5000], x[raised] = 10.0, 9.0
            opts = Options(temperature=0, repeat_penalty=1.0, presence_penalty=-1.0)
            assert make_sampler(opts)(x, [raised, 3]) == min(raised, 5000)


def test_nucleus_wider_than_the_first_guess_matches_a_full_sort():
    """top_p over the whole vocabulary (top_k 0) widens its top-k until the mass is reached: the tokens it
    keeps are the sorted prefix's, also when that takes thousands of tokens."""
    logits = torch.randn(50000, generator=torch.Generator().manual_seed(3)) * 0.5
    for top_p in (0.05, 0.5, 0.95):
        kept = torch.isfinite(filter_logits(logits, Options(top_k=0, top_p=top_p)))
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        want = order[: int((probs.cumsum(-1) - probs < top_p).sum())]
        assert kept.sum() > 64 and sorted(kept.nonzero().flatten().tolist()) == sorted(want.tolist())


def test_draws_follow_the_tempered_softmax_of_the_kept_tokens():
    """With top_k 3 of 200k logits at temperature 0.5, 6000 draws fall on the three kept tokens in the
    proportions softmax(logit / 0.5) gives them (each within 4 standard deviations), and nowhere else."""
    logits = torch.full((200000,), -5.0)
    logits[[17, 123456, 199999]] = torch.tensor([1.0, 1.3, 0.6])
    sample = make_sampler(Options(seed=11, temperature=0.5, top_k=3, top_p=1.0, repeat_penalty=1.0))
    draws = torch.tensor([sample(logits, []) for _ in range(6000)])
    want = torch.softmax(torch.tensor([1.0, 1.3, 0.6]) / 0.5, -1)
    for token, p in zip((17, 123456, 199999), want.tolist()):
        count = int((draws == token).sum())
        assert abs(count - 6000 * p) < 4 * (6000 * p * (1 - p)) ** 0.5, (token, count, p)
    assert set(draws.tolist()) == {17, 123456, 199999}


def test_draw_never_takes_a_masked_token():
    logits = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")])
    generator = torch.Generator().manual_seed(0)
    assert {draw(logits, 1.0, generator) for _ in range(500)} == {1, 3}


@pytest.mark.skipif(not native.available(), reason="no compiled kernels here: the PyTorch chain is all there is")
def test_the_compiled_chain_draws_what_the_pytorch_chain_draws():
    """native.sample_rows (all rows in one call, rows in parallel) against each row's Sampler.chain with the same
    uniform number: peaked and flat logits, repeat/frequency/presence penalties (the top tokens among them),
    top_k, top_p, min_p, temperatures and greedy. The same token every time, except where u lands within
    float rounding of a step of the cumulative sum (those few are left out, and counted)."""
    from wren.sampling import Sampler, candidates, penalties, recent_counts

    g = torch.Generator().manual_seed(21)
    settings = [dict(), dict(top_k=1), dict(top_k=5, top_p=1.0, temperature=1.5), dict(top_p=0.5, min_p=0.05),
                dict(top_k=1024, top_p=0.99, temperature=0.3), dict(repeat_penalty=1.5, frequency_penalty=0.3),
                dict(presence_penalty=-2.0, repeat_last_n=-1), dict(top_k=100, min_p=0.2, temperature=2.0),
                dict(temperature=0), dict(temperature=0, repeat_penalty=1.5, presence_penalty=-3.0, top_k=0)]
    compared = near = 0
    for trial in range(12):
        vocab = 262144 if trial % 3 == 0 else 3000
        logits = torch.randn(len(settings), vocab, generator=g) * (4.0 if trial % 2 else 0.5)
        histories = [torch.topk(logits[r], 30).indices[::2].tolist() + torch.randint(0, vocab, (20,), generator=g)
                     .tolist() for r in range(len(settings))]
        samplers = [Sampler(Options(**s)) for s in settings]
        us = [torch.rand((), generator=g) for _ in settings]
        rows = list(range(len(settings)))
        got = native.sample_rows(logits, rows, [s.opts for s in samplers], us,
                                 [recent_counts(h, s.opts) for h, s in zip(histories, samplers)])
        for r, s in enumerate(samplers):
            if s.opts.temperature == 0:
                assert got[r] == s.chain(logits[r], histories[r]), (trial, settings[r])
                continue
            kept, _ = candidates(logits[r], s.opts, penalties(logits[r], histories[r], s.opts))
            cdf = torch.softmax(kept / s.opts.temperature, -1).cumsum(-1)
            if ((cdf - us[r] * cdf[-1]).abs() < 1e-5 * cdf[-1]).any():
                near += 1
                continue
            compared += 1
            assert got[r] == s.chain(logits[r], histories[r], us[r]), (trial, settings[r])
    assert compared >= 90 and near <= 6, (compared, near)


def test_a_seeded_sampler_draws_the_same_alone_and_beside_others():
    """sample_rows over several samplers gives each the tokens it draws on its own (one uniform number a token
    from its own stream), greedy and constrained-by-options rows among them."""
    from wren.sampling import Sampler, sample_rows

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(50, 4, 5000, generator=g)
    options = [Options(seed=1), Options(seed=2, temperature=0), Options(seed=3, top_k=0), Options(seed=4, top_k=7)]
    together, alone = [Sampler(o) for o in options], [Sampler(o) for o in options]
    histories = [[] for _ in options]
    for step in logits:
        tokens = sample_rows(together, step, histories)
        assert tokens == [alone[r](step[r], histories[r]) for r in range(len(options))]
        for h, t in zip(histories, tokens):
            h.append(t)


def test_a_row_whose_history_leaves_the_vocabulary_fails_alone():
    """A history id outside the logits (a bad `context`) never reaches the compiled chain (it would read past
    the row): that row's own chain raises, as before; with errors=True the exception stands in its place and
    the other rows keep their tokens."""
    from wren.sampling import Sampler, sample_rows

    logits = torch.randn(2, 3000, generator=torch.Generator().manual_seed(6))
    histories = [[1, 2], [5, 3000]]
    together = sample_rows([Sampler(Options(seed=1)), Sampler(Options(seed=2))], logits, histories, errors=True)
    assert together[0] == Sampler(Options(seed=1))(logits[0], histories[0])
    assert isinstance(together[1], IndexError)
    with pytest.raises(IndexError):
        sample_rows([Sampler(Options(seed=1)), Sampler(Options(seed=2))], logits, histories)
    if native.available():  # the compiled call itself refuses it
        from collections import Counter

        with pytest.raises(ValueError, match="ids in V"):
            native.sample_rows(logits, [1], [Options()], [torch.tensor(0.5)], [Counter(histories[1])])
