"""`wren bench`: how fast a model runs as loaded here, and how close that is to what the memory allows.

Decoding one token reads every weight the step touches once (and the KV cache up to the current position),
so its limit is memory bandwidth / bytes read per token. The bandwidth is measured on the spot with a large
copy; the bytes come from the loaded model in the form its kernels actually read (a dense fp32 weight is 4
bytes a weight, the CPU fast path's int8 levels 1, the CUDA kernels' packed codes bits/8). Prompts are
seeded random token ids, as llama-bench uses, so any model can be measured without a text.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from .errors import BadOptionError
from .generation import PREFILL_CHUNK
from .graphs import StaticDecoder, decode_step
from .sampling import greedy


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Bytes/s of a large tensor copy (each copy reads and writes nbytes); the best of `repeat`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _read_bytes(module: nn.Module) -> int:
    """Bytes one decode step reads from a linear-like module (or a tied head), as its kernel reads them."""
    from . import native
    from .quant import linear as tq

    blocks = getattr(module, "blocks", None)
    if isinstance(module, tq.TQWeight) and isinstance(blocks, torch.Tensor):  # a GGUF's blocks, read as stored
        return blocks.nbytes
    if isinstance(module, tq.TQWeight):
        device = next(module.buffers()).device  # (codes, or levels alone: quant/levels.py)
        on_cpu_fast = tq._fast_paths and device.type == "cpu" and module.cfg.rotation == "hadamard"
        if on_cpu_fast and not module.reads_codes():  # int8 levels and a bf16 row scale (cpu_kernels.int8_levels)
            levels = module.out_features * (module.in_features + 2)
            if native.supports(module.cfg):  # and the compiled kernels' float32 sums of each group's levels
                levels += module.out_features * (module.in_features // module.group) * 4
            return levels
        return module.codes.nbytes + module.scales.nbytes
    weight = getattr(module, "weight", None)
    return weight.nbytes if isinstance(weight, torch.Tensor) else 0


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every linear layer, the top-k experts' share of MoE stacks,
    and the LM head (for a tied head, the whole embedding table); embedding and per-layer-embedding lookups
    read one row each and are left out."""
    from .quant import linear as tq
    from .quant.experts import TQMatrices

    cfg = model.config
    experts_read = (cfg.top_k_experts or 1) / (cfg.num_experts or 1) if getattr(cfg, "num_experts", None) else 1.0
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, tq.TQLinear)):
            total += _read_bytes(m)
        elif isinstance(m, TQMatrices):  # MoE: a token reads its top-k experts' codes
            total += int((m.codes.nbytes + m.scales.nbytes) * experts_read)
        elif isinstance(getattr(m, "gate_up_proj", None), nn.Parameter):
            total += int(sum(p.nbytes for p in m.parameters(recurse=False)) * experts_read)
    if model.lm_head is None:
        total += _read_bytes(model.embed_tokens)
    return total


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (VmHWM), or None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _prompt(model, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    low = min(1000, vocab // 2)  # past the special tokens
    ids = torch.randint(low, vocab, (n,), generator=g).tolist()
    bos = getattr(getattr(model, "tokenizer", None), "bos_id", None)
    return ([bos] + ids[1:]) if bos is not None else ids


def _one_run(model, prompt: list[int], gen: int, kv_cache, sampler=None) -> tuple[float, float]:
    """(seconds to the first token, seconds per decoded token) for one prompt: greedy, or each token drawn
    by `sampler` (sampling.make_sampler's closure) given the tokens so far."""
    from .kv import make_kv_cache

    device = model.norm.weight.device
    history = list(prompt)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if sampler is None:
            return _greedy(logits)
        history.append(sampler(logits, history))
        return torch.tensor([[history[-1]]], device=device)

    cache = make_kv_cache(model, batch=1, max_len=len(prompt) + gen + 1, spec=kv_cache, device=device)
    x = torch.tensor([prompt], device=device)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, x.shape[1], PREFILL_CHUNK):
        logits = model(x[:, s:s + PREFILL_CHUNK], cache, logits_to_keep=1)
    token = pick(logits[0, -1])
    _sync(device)
    ttft = time.perf_counter() - t0
    step = decode_step(model, cache)
    timed = gen
    if isinstance(step, StaticDecoder) and gen > 1:  # its first call captures the CUDA graph: not timed
        token = pick(step(token)[0])
        timed -= 1
        _sync(device)
    t1 = time.perf_counter()
    for _ in range(timed):
        token = pick(step(token)[0])
    _sync(device)
    return ttft, (time.perf_counter() - t1) / max(timed, 1)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """The next token [1, 1], as `wren run --temperature 0` picks it; on a GPU without a sync."""
    if logits.device.type == "cpu":
        return torch.tensor([[greedy(logits)]])
    return logits.argmax().view(1, 1)


def bench(model, prompt_tokens: int = 512, gen_tokens: int = 64, repeat: int = 3, kv_cache=None,
          seed: int = 0) -> dict:
    """Prefill and decode speed (medians over `repeat` runs, after a warm-up), time to first token, peak
    resident memory, and the decode limit bandwidth / bytes read per token at the run's mean context."""
    from .kv import kv_cache_bytes, resolve_types, spec_name

    limit = model.config.max_position_embeddings
    if prompt_tokens < 1 or gen_tokens < 1 or repeat < 1:
        raise BadOptionError("--prompt, --gen and --repeat must be at least 1")
    if prompt_tokens + gen_tokens > limit:
        raise BadOptionError(f"--prompt {prompt_tokens} + --gen {gen_tokens} tokens exceed the model's "
                             f"context of {limit}; ask for fewer")
    types = resolve_types(model, kv_cache if kv_cache is not None else getattr(model, "kv_cache", None))
    prompt = _prompt(model, prompt_tokens, seed)
    with torch.inference_mode():
        _one_run(model, prompt[:16], 4, types)  # warm-up: first-call allocations, lazily built kernels
        runs = [_one_run(model, prompt, gen_tokens, types) for _ in range(repeat)]
    ttft = statistics.median(r[0] for r in runs)
    per_token = statistics.median(r[1] for r in runs)
    peak_rss = peak_rss_bytes()  # before the bandwidth probe's two 256 MiB buffers
    device = model.norm.weight.device
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes_per_token(model)
    # the cache a mid-generation step reads: every position so far, sliding layers only their window
    kv_read = kv_cache_bytes(model, types, 1, prompt_tokens + gen_tokens // 2)
    return {
        "prefill_tok_s": prompt_tokens / ttft,
        "decode_tok_s": 1 / per_token,
        "ttft_s": ttft,
        "peak_rss_bytes": peak_rss,
        "limit_tok_s": bandwidth / (weights + kv_read),
        "bandwidth_bytes_s": bandwidth,
        "weight_bytes_per_token": weights,
        "kv_cache": spec_name(types),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeat": repeat,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def default_threads() -> int:
    """Physical cores where the OS says (hyper-threads share a core's memory port and FPU), else all."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return min(len(cores), len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        pass
    return os.cpu_count() or 1
