"""The server's pieces without HTTP: the slot cache, the batching engine, JSON-constrained decoding, tools."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest
import torch

import wren
from slot_driver import drive, random_sequences
from wren.cache import SlotCache
from wren.kv import CompressedSlotCache, make_kv_cache, resolve_types
from wren.sampling import Options
from wren.server.constrained import ANY_OBJECT, Constraint, Matcher, TokenTable, compile_schema
from wren.server.engine import Engine, Job, hidden_mean
from wren.server.tools import call_schema, parse_tool_calls, render_messages

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2},
    "score": {"type": ["number", "null"], "maximum": 10},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("name", ["gemma3", "gemma4-e2b", "gemma4-26b"])
def test_slot_cache_rows_are_independent_sequences(tiny, name):
    """Rows prefilled separately, decoded together at different lengths, past the sliding window, and a row
    truncated and reused: every logit equals a full forward of that sequence alone."""
    model = wren.load(tiny[name][1])
    seqs = random_sequences(3)
    with torch.no_grad():
        full = {r: model(torch.tensor([s]))[0] for r, s in seqs.items()}
        out, again = drive(model, SlotCache.for_model(model, 4, 40), seqs)
        for r in seqs:
            assert (out[r] - full[r]).abs().max() < 1e-4
        assert (again - full[3][29]).abs().max() < 1e-4


def run_jobs(engine: Engine, jobs: list[tuple[list[int], Options]]) -> list[list[int]]:
    """Submit all at once; the token ids each produced."""
    outs = [[] for _ in jobs]
    done = threading.Semaphore(0)
    made = []
    for i, (prompt, opts) in enumerate(jobs):
        def emit(event, i=i):
            if event[0] == "token":
                outs[i].append(event[1])
            elif event[0] in ("done", "error"):
                done.release()
        kv = resolve_types(engine.model, opts.kv_cache) if opts.kv_cache else None  # as server/common.py does
        made.append(Job(prompt, opts, {1}, emit, ctx=256, kv_types=kv))
    for job in made:
        engine.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=60)
    return outs


def test_batched_seeded_sampling_equals_alone_and_generate(tiny):
    model = wren.load(tiny["gemma3"][2])
    engine = Engine(model, slots=3, ctx=256)
    try:
        jobs = [([2, 10 + i, 20 + i, 30], Options(seed=i, num_predict=12, temperature=1.0)) for i in range(5)]
        together = run_jobs(engine, jobs)  # 5 jobs, 3 rows: two join the batch while it runs
        alone = [run_jobs(engine, [j])[0] for j in jobs]
        assert together == alone
        assert all(len(t) == 12 for t in together)
    finally:
        engine.close()
    # the engine's sampler is the CLI's: a seeded request gives what wren.generate gives
    from wren.generation import Generation
    ref = [t for (t,) in Generation(model, [jobs[1][0]], jobs[1][1], {1})]
    assert ref[: len(alone[1])] == alone[1]


def test_per_request_kv_cache_types(tiny):
    """A request's kv_cache option switches the engine's cache (once the batch drains); each request's tokens
    equal a single-sequence generation through that cache type, alone or queued beside other types."""
    from wren.generation import Generation

    model = wren.load(tiny["gemma4-e2b"][1])
    engine = Engine(model, slots=2, ctx=128)
    prompt = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    kinds = [None, "tq3", "q8/tq2.5", None]
    opts = {kv: Options(seed=7, temperature=1.5, num_predict=10, kv_cache=kv) for kv in kinds}
    try:
        ref = {kv: [t for (t,) in Generation(model, [prompt], opts[kv], {1}, kv_cache=kv)] for kv in kinds}
        with torch.no_grad():  # the types do change what the model computes
            dense = model(torch.tensor([prompt]))
            coded = model(torch.tensor([prompt]), make_kv_cache(model, 1, 64, spec="q8/tq2.5"))
        assert (dense - coded).abs().max() > 1e-3
        for kv in kinds:
            assert run_jobs(engine, [(prompt, opts[kv])])[0] == ref[kv][:10]
            assert engine.kv_types == resolve_types(model, kv)
            assert isinstance(engine.cache, CompressedSlotCache) == (kv is not None)
        together = run_jobs(engine, [(prompt, opts[kv]) for kv in kinds])
        assert together == [ref[kv][:10] for kv in kinds]
    finally:
        engine.close()


def test_prefix_reuse_continues_exactly(tiny):
    model = wren.load(tiny["gemma4-e2b"][1])
    engine = Engine(model, slots=2, ctx=256)
    try:
        first_prompt = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
        opts = Options(temperature=0, num_predict=8, repeat_penalty=1.0)
        first = run_jobs(engine, [(first_prompt, opts)])[0]
        follow = first_prompt + first[:-1] + [50, 51, 52]  # the next turn extends what the row holds
        reused = run_jobs(engine, [(follow, opts)])[0]
        fresh = Engine(model, slots=1, ctx=256)
        try:
            assert run_jobs(fresh, [(follow, opts)])[0] == reused
        finally:
            fresh.close()
        row = next(s for s in engine.slots if s.tokens[:len(follow)] == follow)
        assert row.tokens[: len(first_prompt)] == first_prompt
    finally:
        engine.close()


def test_cancel_frees_the_row_and_queue_limit(tiny):
    from wren.server.engine import QueueFullError

    model = wren.load(tiny["gemma3"][2])
    engine = Engine(model, slots=1, ctx=256, max_queue=1)
    try:
        events = []
        long = Job([2, 3, 4], Options(num_predict=-1, seed=0), set(), events.append, ctx=256)
        engine.submit(long)
        import time
        deadline = time.time() + 30
        while engine.active_count == 0 and time.time() < deadline:
            time.sleep(0.01)
        waiting = Job([2, 5], Options(num_predict=2, seed=0), {1}, lambda e: None, ctx=256)
        engine.submit(waiting)
        with pytest.raises(QueueFullError):
            engine.submit(Job([2, 6], Options(num_predict=2), {1}, lambda e: None, ctx=256))
        long.cancel()
        while (engine.active_count or engine.queue_depth) and time.time() < deadline:
            time.sleep(0.01)
        assert engine.active_count == 0 and engine.queue_depth == 0
        assert events[-1][0] == "done" and events[-1][1].done_reason == "cancel"
    finally:
        engine.close()


def test_hidden_mean_is_the_last_hidden_state(tiny):
    hf, folder, _ = tiny["gemma3"]
    model = wren.load(folder)
    ids = [2, 50, 60, 70, 80]
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)
    assert torch.allclose(torch.tensor(hidden_mean(model, ids)), ref, atol=1e-4)


@pytest.mark.parametrize("text, ok", [
    ('{"name": "bob", "age": 42, "ok": true}', True),
    ('{"ok":false,"age":120,"name":"abcdef","tags":["red","blue"],"score":-1.5e1}', True),
    ('{"name": "bob", "ok": true}', False),  # age is required
    ('{"name": "abcdefg", "age": 1, "ok": true}', False),  # maxLength
    ('{"name": "a", "age": 121, "ok": true}', False),  # maximum
    ('{"name": "a", "age": -1, "ok": true}', False),  # minimum
    ('{"name": "a", "age": 1, "ok": true, "x": 1}', False),  # additionalProperties
    ('{"name": "a", "age": 1.5, "ok": true}', False),  # integer
    ('{"name": "a", "age": 1, "ok": true, "tags": ["red", "red", "red"]}', False),  # maxItems
    ('{"name": "a", "name": "b", "age": 1, "ok": true}', False),  # no repeated key (json.loads would allow it)
])
def test_schema_matcher(text, ok):
    m = Matcher(compile_schema(SCHEMA))
    try:
        m.advance(text)
        accepted = m.complete
    except ValueError:
        accepted = False
    assert accepted == ok
    assert ok == _valid(text) or text.count('"name"') > 1


def _valid(text):
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_generic_json_matcher():
    m = Matcher(ANY_OBJECT)
    m.advance('{"a": [1, -2.5e3, true, null, {"b": "c\\u00e9\\n"}], "d": false}')
    assert m.complete
    for bad in ('{"a": tru }', '[1]', '{"a" 1}', '{"a": 01}', '{"a": "\x01"}'):
        with pytest.raises(ValueError):
            Matcher(ANY_OBJECT).advance(bad)


@pytest.mark.parametrize("seed", range(4))
def test_constrained_sampling_from_a_random_model_validates(tiny, seed):
    """A random model follows the schema only because of the constraint; the output parses and validates."""
    model = wren.load(tiny["gemma3"][2])
    engine = Engine(model, slots=2, ctx=256)
    table = TokenTable.get(model.tokenizer, model.config.vocab_size)
    try:
        outs = []
        for temperature in (0.0, 1.0):
            opts = Options(seed=seed, temperature=temperature, num_predict=250)
            constraint = Constraint(compile_schema(SCHEMA), table, opts, {1, 5})
            done = threading.Event()
            tokens = []
            job = Job([2, 4, 30 + seed], opts, {1, 5}, lambda e: tokens.append(e[1]) if e[0] == "token" else
                      done.set(), ctx=256, constraint=constraint)
            engine.submit(job)
            assert done.wait(60)
            assert job.stats.done_reason == "stop", "the value did not finish within num_predict"
            outs.append(model.tokenizer.decode(tokens))
        for text in outs:
            jsonschema.validate(json.loads(text), SCHEMA)
    finally:
        engine.close()


def test_tool_calls_parse_and_render():
    fns = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    assert parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}', fns) == \
        [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert parse_tool_calls('```json\n[{"name": "get_weather", "parameters": {"city": "Rome"}}]\n```', fns) == \
        [{"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert parse_tool_calls('{"name": "launch", "arguments": {}}', fns) is None
    assert parse_tool_calls("It is sunny.", fns) is None
    msgs = render_messages([{"role": "user", "content": "weather?"},
                            {"role": "assistant", "content": "", "tool_calls": [
                                {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                            {"role": "tool", "content": "12C", "tool_name": "get_weather"}], fns)
    assert msgs[0]["role"] == "system" and '"get_weather"' in msgs[0]["content"]
    assert json.loads(msgs[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert msgs[3]["content"] == "Result of get_weather: 12C"
    m = Matcher(compile_schema(call_schema(fns)))
    m.advance('{"name": "get_weather", "arguments": {"city": "x"}}')
    assert m.complete


@pytest.mark.parametrize("schema", [None, SCHEMA, {"type": "array", "items": {"type": "object", "properties": {
    "k": {"type": "string"}}, "required": ["k"]}, "minItems": 2}])
@pytest.mark.parametrize("budget", [1, 7, 20])
def test_a_cut_off_value_is_closed_so_it_still_parses(tiny, schema, budget):
    """Strings without maxLength never end on their own in a random model: num_predict cuts them, and the
    constraint spends its last tokens closing the value instead."""
    model = wren.load(tiny["gemma3"][2])
    table = TokenTable.get(model.tokenizer, model.config.vocab_size)
    root = ANY_OBJECT if schema is None else compile_schema(schema)
    opts = Options(seed=budget, temperature=1.0, num_predict=budget)
    constraint = Constraint(root, table, opts, {1, 5})
    engine = Engine(model, slots=1, ctx=256)
    try:
        tokens, done = [], threading.Event()
        job = Job([2, 4, 40], opts, {1, 5}, lambda e: tokens.append(e[1]) if e[0] == "token" else done.set(),
                  ctx=256, constraint=constraint)
        engine.submit(job)
        assert done.wait(60)
    finally:
        engine.close()
    value = json.loads(model.tokenizer.decode(tokens))
    if schema is not None:
        jsonschema.validate(value, schema)
    assert len(tokens) <= budget + 40


def test_closing_texts():
    m = Matcher(compile_schema(SCHEMA))
    for prefix in ['{"na', '{"name": "ab', '{"name": "ab", "age": 1', '{"name": "a\\u00', '{"tags": ["re',
                   '{"score": -', '{"score": 1.', '{"name": "x", "age": 3, "ok": t', '{"name": "x",']:
        m = Matcher(compile_schema(SCHEMA))
        m.advance(prefix)
        text = prefix + m.closing()
        jsonschema.validate(json.loads(text), SCHEMA)


def test_an_error_in_one_row_fails_only_that_request(tiny):
    class Broken:
        forcing = False

        def sample(self, logits, history):
            raise RuntimeError("boom")

    model = wren.load(tiny["gemma3"][2])
    engine = Engine(model, slots=2, ctx=256)
    try:
        events = {"bad": [], "good": []}
        done = threading.Semaphore(0)

        def sink(name):
            def emit(e):
                events[name].append(e)
                if e[0] in ("done", "error"):
                    done.release()
            return emit

        engine.submit(Job([2, 9, 9], Options(num_predict=5), {1}, sink("bad"), ctx=256, constraint=Broken()))
        engine.submit(Job([2, 8, 8], Options(num_predict=5, seed=1), set(), sink("good"), ctx=256))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        assert events["bad"][-1][0] == "error" and "boom" in str(events["bad"][-1][1])
        assert events["good"][-1][0] == "done" and sum(e[0] == "token" for e in events["good"]) == 5
        assert engine.active_count == 0
    finally:
        engine.close()
