"""A GGUF's linear layers read in place (`--low-memory`: wren/quant/blocks.py, wren/_gguf_blocks.h): the
kernel against the dequantized weights for every block type it reads, and a model loaded this way against
the exact one (decode through the kernels and the decode plan, prefill through the dequantized rows)."""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

import wren
from gguf_writer import write_gguf
from tiny_models import gemma3_hf, gemma4_hf
from wren import decode_plan, native, speed
from wren.cache import KVCache
from wren.quant.blocks import PREFILL_ROWS, BlocksEmbedding, BlocksLinear
from wren.quant.levels import LevelsEmbedding
from wren.quant.levels import LevelsLinear, to_levels
from wren.quant.linear import reference_path
from wren.weights.gguf import GGUFFile
from wren.weights.gguf_quants import dequantize

Q = gguf.GGMLQuantizationType
needs_kernels = pytest.mark.skipif(not native.blocks_readable(),
                                   reason="the GGUF block kernels need AVX-512 VNNI, VL and F16C, or AVX2")
HALVES = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82], Q.Q3_K: [108],
          Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}  # the byte offsets of each block's fp16 scales (and mins)


def _random_blocks(qtype, rows: int, width: int, seed: int) -> torch.Tensor:
    """Blocks of random bytes (every bit pattern is a valid block) whose fp16 scales are small and finite."""
    weights, size = gguf.GGML_QUANT_SIZES[qtype]
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (rows * width // weights, size), dtype=torch.uint8, generator=g)
    for at in HALVES[qtype]:
        b[:, at:at + 2] = (torch.rand(b.shape[0], 1, generator=g) * 0.02 + 0.001).half().view(torch.uint8)
    return b.reshape(rows, -1).contiguous()


def test_the_kernel_reads_every_type_it_claims():
    assert {int(t) for t in HALVES} == native.IN_PLACE_TYPES


# input rows, output rows, width: one row; a few rows (each row's blocks read for 4 at a time); 12 or more
# (unpacked once per 16 rows into tiles: 8 input rows at a time, then one at a time); a width of 32s only
SHAPES = [(1, 37, 512), (3, 16, 768), (7, 5, 256), (13, 37, 512), (24, 16, 768), (1, 9, 96), (13, 9, 96)]


@needs_kernels
@pytest.mark.parametrize("qtype,rows,out,width", [(t, *shape) for t in HALVES for shape in SHAPES
                                                  if shape[2] % gguf.GGML_QUANT_SIZES[t][0] == 0])
def test_matmul_equals_the_dequantized_weights_times_the_int8_input(qtype, rows, out, width):
    """Exact up to float rounding: the kernel's only approximation is the input's int8 rounding, which the
    reference takes too."""
    blocks = _random_blocks(qtype, out, width, seed=rows)
    w = dequantize(blocks.numpy().reshape(-1), qtype, (out, width)).double()
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(1))
    q = native.quantize_blocks(x)
    x_int8 = (q.values.double() - 128) * q.scales.double().repeat_interleave(native.BLOCK_INPUT, dim=1)
    assert float((x_int8 - x).norm() / x.norm()) < 0.01  # int8 per block of 32: ~0.5%
    got = native.BlocksWeight(blocks, int(qtype), width).matmul(q).double()
    want = x_int8 @ w.T
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5  # measured <= 4e-7


@needs_kernels
@pytest.mark.parametrize("qtype", list(HALVES), ids=lambda t: t.name)
def test_dequantized_and_level_rows_are_those_of_the_python_reference(qtype):
    """Prefill's two conversions of the blocks, bit for bit: dequantized (gguf_quants.dequantize) and as
    the int8 levels a GGUF's layers hold in `wren run` (levels.to_levels of the dequantized rows)."""
    blocks = _random_blocks(qtype, 33, 512, seed=3)
    w = dequantize(blocks.numpy().reshape(-1), qtype, (33, 512))
    assert torch.equal(native.dequantize_blocks(blocks, int(qtype), 512), w)
    want = to_levels(w)
    got = native.blocks_to_levels(blocks, int(qtype), 512, 128, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_kernels
def test_the_kernel_refuses_mixed_inputs_and_odd_widths():
    blocks = _random_blocks(Q.Q8_0, 16, 96, seed=0)
    rotated = native.QuantizedInput(torch.zeros(1, 128, dtype=torch.uint8), torch.ones(1, 1), 128)
    with pytest.raises(ValueError):
        native.BlocksWeight(blocks, int(Q.Q8_0), 96).matmul(rotated)
    with pytest.raises(ValueError):
        native.BlocksWeight(blocks, int(Q.IQ4_XS), 96)


@pytest.fixture(scope="module")
def hf():
    return gemma3_hf(hidden=128, head_dim=32, intermediate=256)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@needs_kernels
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0])
def test_a_model_read_in_place_is_close_to_the_exact_one(hf, tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, path, "gemma3", tensor_type=qtype)
    exact, fast = wren.load(path), wren.load(path, int8=True, in_place=True)
    levels = wren.load(path, int8=True)
    kinds = {n: type(fast.get_submodule(n)) for n, m in exact.named_modules() if isinstance(m, nn.Linear)}
    assert set(kinds.values()) == {BlocksLinear}
    stored = GGUFFile(path).raw("blk.0.ffn_down.weight")
    assert torch.equal(fast.layers[0].mlp.down_proj.blocks.reshape(-1), torch.from_numpy(stored.copy()))
    assert any("in place" in note for note in fast.notes)
    ids = torch.randint(8, 384, (1, PREFILL_ROWS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # a long prefill: the int8 levels `wren run` holds, made for the call, bit for bit
        assert torch.equal(fast(ids), levels(ids))
        with reference_path():  # the exact weights, dequantized from the blocks
            assert _relative(fast(ids), exact(ids)) < 1e-5
        # shorter prompts: the kernels that read the blocks, every row (in tiles; a few rows at a time)
        for short in (ids[:, :PREFILL_ROWS - 1], ids[:, :20], ids[:, :5]):
            assert _relative(fast(short), exact(short)) < 0.02
        # decode: the kernels, a row at a time, through the decode plan and through the modules
        ids = ids[:, :40]
        steps, n = {}, ids.shape[1]
        for name, plan in (("exact", None), ("plan", True), ("modules", False)):
            model = exact if name == "exact" else fast
            decode_plan.ENABLED = bool(plan)
            try:
                cache = KVCache(model.specs, 1, 64, model.config.sliding_window)
                model(ids[:, :-4], cache=cache)
                steps[name] = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(n - 4, n)], dim=1)
                if plan:
                    assert cache._decode_plan[1] is not None
            finally:
                decode_plan.ENABLED = True
    assert _relative(steps["plan"], steps["exact"]) < 0.02  # the input's int8 rounding: measured ~0.5%
    assert _relative(steps["modules"], steps["plan"]) < 0.02
    assert (steps["plan"].argmax(-1) == steps["exact"].argmax(-1)).float().mean() >= 0.75


@needs_kernels
def test_gemma4_with_per_layer_embeddings_in_place(tmp_path):
    """Gemma 4 (E2B's shape: PLE, KV sharing, double-wide MLPs): every linear layer reads its blocks, the
    32-wide per-layer projection too (one block a row), and the decode plan takes them all."""
    hf = gemma4_hf("e2b", head_dim=32, hidden_size=128, intermediate_size=256, hidden_size_per_layer_input=32)
    path = tmp_path / "e2b.gguf"
    write_gguf(hf, path, "gemma4", tensor_type=Q.Q8_0)
    exact, fast = wren.load(path), wren.load(path, int8=True, in_place=True)
    assert isinstance(fast.layers[0].per_layer_projection, BlocksLinear)
    assert not any(isinstance(m, nn.Linear) for m in fast.layers.modules())
    ids = torch.randint(8, 384, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = exact(ids)[0, -4:]
        cache = KVCache(fast.specs, 1, 32, fast.config.sliding_window)
        fast(ids[:, :-4], cache=cache)
        got = torch.cat([fast(ids[:, i:i + 1], cache=cache)[0] for i in range(16, 20)])
        assert cache._decode_plan[1] is not None
    assert _relative(got, want) < 0.02
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


@needs_kernels
def test_a_tied_head_under_8_bits_is_read_in_place_too(hf, tmp_path):
    """A Q4_0 embedding (4.5 bits) is the LM head's blocks, read in place, and its lookups the file's rows; a
    Q8_0 one (8.5 bits) stays int8 levels, smaller."""
    path, q8 = tmp_path / "q4.gguf", tmp_path / "q8.gguf"
    write_gguf(hf, path, "gemma3", tensor_type=Q.Q4_0, tied=True)
    write_gguf(hf, q8, "gemma3", tensor_type=Q.Q8_0, tied=True)
    exact, fast = wren.load(path), wren.load(path, int8=True, in_place=True)
    assert fast.lm_head is None and isinstance(fast.embed_tokens, BlocksEmbedding)
    assert isinstance(wren.load(q8, int8=True, in_place=True).embed_tokens, LevelsEmbedding)
    ids = torch.randint(8, 384, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fast.embed_tokens(ids), exact.embed_tokens(ids))  # lookups: exact rows
        want = exact(ids)[0, -4:]
        cache = KVCache(fast.specs, 1, 32, fast.config.sliding_window)
        fast(ids[:, :-4], cache=cache)
        got = torch.cat([fast(ids[:, i:i + 1], cache=cache)[0] for i in range(20, 24)])
        full = fast(ids)  # every position's logits: the head for many rows at once
    assert _relative(got, want) < 0.02 and _relative(full, exact(ids)) < 0.02
    assert speed.weight_bytes_per_token(fast) < speed.weight_bytes_per_token(wren.load(path, int8=True))


def test_without_in_place_the_layers_stay_levels(hf, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, path, "gemma3", tensor_type=Q.Q8_0)
    model = wren.load(path, int8=True)
    assert isinstance(model.layers[0].self_attn.q_proj, LevelsLinear)


def _teacher_forced(model, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of positions prefill-1 .. end-1: the first from the prefill, the rest a token at a time."""
    cache = KVCache(model.specs, 1, tokens.shape[1] + 1, model.config.sliding_window)
    logits = [model(tokens[:, :prefill], cache=cache)[0, -1:]]
    logits += [model(tokens[:, i:i + 1], cache=cache)[0] for i in range(prefill, tokens.shape[1] - 1)]
    return torch.cat(logits)


@needs_kernels
@pytest.mark.slow
def test_default_model_decodes_in_place_close_to_its_exact_weights(default_model):
    """Real weights (Q5_0, Q4_K, Q6_K, Q8_0 layers): 235 tokens of prose decoded a token at a time through the
    kernels, after a prefill of 65 through them too (in tiles), keep the exact model's perplexity within 2% and
    its top-1 token (measured: +0.6%; +1.0%, 0.975 with that prefill on the levels; the int8 levels of
    `wren run` on the same tokens: +0.6%, 0.966)."""
    from real_text import stdlib_prose

    fast = wren.load(int8=True, in_place=True)
    kinds = {fast.get_submodule(n).ggml_type for n, m in fast.named_modules() if isinstance(m, BlocksLinear)}
    assert kinds == {int(Q.Q5_0), int(Q.Q4_K), int(Q.Q6_K), int(Q.Q8_0)}
    ids = default_model.tokenizer.encode(stdlib_prose())[:300]
    tokens = torch.tensor([[default_model.tokenizer.bos_id] + ids])
    with torch.no_grad():
        want = default_model(tokens)[0, 64:-1]
        got = _teacher_forced(fast, tokens, 65)
    target = tokens[0, 65:]

    def ppl(logits):
        return float(torch.exp(-torch.log_softmax(logits, -1)[torch.arange(len(target)), target].mean()))

    print(f"perplexity exact {ppl(want):.4f} in place {ppl(got):.4f}")
    assert abs(ppl(got) / ppl(want) - 1) < 0.02
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.93


@pytest.mark.slow
def test_run_and_bench_take_low_memory():
    import json
    import subprocess
    import sys

    def wren_cli(*args):
        return subprocess.run([sys.executable, "-m", "wren", *args], capture_output=True, text=True, timeout=300)

    run = wren_cli("run", "--raw", "The capital of France is", "--temperature", "0", "--num-predict", "6",
                   "--low-memory")
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    bench = wren_cli("bench", "--low-memory", "--json", "--prompt", "16", "--gen", "4", "--repeat", "1")
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    read = report["weight_bytes_per_token"]
    levels = json.loads(wren_cli("bench", "--json", "--prompt", "16", "--gen", "4", "--repeat", "1").stdout)
    if native.blocks_readable():  # the layers read at their GGUF sizes, not 8 bits a weight
        assert read < levels["weight_bytes_per_token"] - 20_000_000
    else:
        assert read == levels["weight_bytes_per_token"]


def test_perplexity_measures_the_weights_as_they_run(hf, tmp_path, capsys):
    """`wren perplexity --int8 / --low-memory` score the weights `wren run` (--low-memory) multiplies: windows
    of 64 tokens on the int8 levels, or on the kernels that read the blocks; both close to the exact weights."""
    import json
    import math

    from real_text import stdlib_prose
    from wren import cli

    path, text = tmp_path / "tiny.gguf", tmp_path / "text.txt"
    write_gguf(hf, path, "gemma3", tensor_type=Q.Q4_0)
    text.write_text(stdlib_prose()[:4000])
    results = {}
    for flags in ([], ["--int8"], ["--low-memory"]):
        assert cli.main(["perplexity", str(path), "--file", str(text), "--ctx", "64", "--chunks", "3", "--json",
                         *flags]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        results[result["weights"]] = result["perplexity"]
    assert set(results) == {"exact", "int8", "low-memory"}
    log_ppl = {k: math.log(v) for k, v in results.items()}  # a random model: a huge perplexity
    assert abs(log_ppl["int8"] - log_ppl["exact"]) <= 1e-3 * log_ppl["exact"]  # measured 1.2e-4
    assert abs(log_ppl["low-memory"] - log_ppl["exact"]) <= 1e-3 * log_ppl["exact"]
    assert log_ppl["low-memory"] != log_ppl["int8"]  # two ways to multiply, not one
