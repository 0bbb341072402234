"""Compile every Triton kernel of wren's CUDA decode step for a GPU, on a machine without one, and count
what the compiled code does: no GPU needed, nothing timed.

    python bench/gpu_compile.py                        # the 31B and E2B shapes, for an H100/H200 (sm_90)
    python bench/gpu_compile.py --arch 89              # an RTX 4090 / L40S
    python bench/gpu_compile.py --shapes tiny --check  # the tests: exit 1 on any kernel that fails

Triton compiles for whatever target its driver reports, and ships ptxas: a stand-in driver here reports
the architecture asked for, and every kernel launch is compiled instead of run (every autotune config
of it). The model is the Gemma 4 shape of bench/gpu_decode.py with two decoder layers (a sliding and a
full one; E2B: two more that read their K/V) and a 4096-token vocabulary, its linear layers and
tied embedding TurboQuant 4-bit in groups of 128, all empty (compiling reads no values). It prefills a
short prompt and decodes at batch 1 and 8, with an f16 and a TurboQuant (tq4) cache, through the static
decode step: the launches, shapes and constants a GPU would get.

Per compiled kernel: registers, spilled and stack bytes, shared memory, and the instructions of its main
loop; for the weight kernels, loop instructions per weight code too (a thread's, for all the activation
rows a program takes: one for the row GEMV, up to 8 or 16 for the others). A GPU issues four warp instructions a cycle per SM,
so at ~4.8 TB/s (H200) a 4-bit GEMV must spend at most ~3.5 instructions per code to keep up (2.5 for
the ~70% the issue asks, less what the loads cost); this is how the kernels were shaped before any GPU ran
them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import SHAPES, SL, FU  # noqa: E402

VOCAB = 4096


launches: list[str] = []  # the Triton launches made under compile_only, one per call


@contextlib.contextmanager
def compile_only(arch: int):
    """Within: every Triton launch compiles for sm_<arch> (each autotune config) and runs nothing; yields
    the list of (kernel name, compiled kernel) it fills. `launches` gets each launch's kernel name."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class StandIn:  # what JITFunction.run asks of a driver before it compiles
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled = []
    run, tuned = JITFunction.run, Autotuner.run
    tuning = []  # (within an autotuned launch: its configs' compiles are one launch)

    def compile_launch(self, *args, grid, warmup, **kwargs):
        compiled.append((self.fn.__name__, run(self, *args, grid=grid, warmup=True, **kwargs)))
        if not tuning:
            launches.append(self.fn.__name__)

    def compile_configs(self, *args, **kwargs):
        tuning.append(1)
        self.nargs = dict(zip(self.arg_names, args))  # (what Autotuner.run sets for the pruning)
        try:
            for config in self.prune_configs(kwargs):
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            tuning.pop()
            self.nargs = None
        launches.append(compiled[-1][0])

    before = driver._active  # (None until a driver is asked for: then the next use finds the machine's)
    driver.set_active(StandIn())
    JITFunction.run, Autotuner.run = compile_launch, compile_configs
    try:
        yield compiled
    finally:
        JITFunction.run, Autotuner.run = run, tuned
        driver.set_active(before)


def model(shape: str):
    """The shape with two decoder layers and a small vocabulary, on empty 4-bit TurboQuant weights."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from wren.config import config_from_dict
    from wren.quant import folder
    from wren.weights.load import _build, _wren_name
    from wren.weights.tables import RowTable

    fields = dict(SHAPES[shape], num_hidden_layers=2, layer_types=[SL, FU], vocab_size=VOCAB,
                  vocab_size_per_layer_input=VOCAB)
    if fields.get("num_kv_shared_layers"):  # then two more, reading the first two's K/V
        fields.update(num_hidden_layers=4, layer_types=[SL, FU, SL, FU], num_kv_shared_layers=2)
    with torch.device("meta"):
        hf = Gemma4ForCausalLM(Gemma4TextConfig(**fields, max_position_embeddings=8192, final_logit_softcapping=30.0))
    cfg = config_from_dict(hf.config.to_dict())
    tensors, table = {}, None
    for name, t in hf.state_dict().items():
        name = _wren_name(name)
        if name == "embed_tokens_per_layer.weight":
            table = RowTable.from_tensor(torch.zeros(t.shape, dtype=torch.bfloat16))
        else:
            tensors[name] = (t.shape, lambda t=t: torch.ones(t.shape, dtype=torch.bfloat16) * 0.01)
    wren_model = _build(cfg, tensors, torch.bfloat16, table)
    group = 128 if cfg.hidden_size % 128 == 0 else 0
    modules = {name: {"bits": 4, "group": group or wren_model.get_submodule(name).in_features, "kind": "linear"}
               for name in folder._linear_names(wren_model)}
    modules["embed_tokens"] = {"bits": 4, "group": group or cfg.hidden_size, "kind": "embedding"}
    folder.install(wren_model, {"format": folder.FORMAT, "seed": 0, "modules": modules})
    return wren_model.to(torch.bfloat16).eval()


def decode(wren_model, batches=(1, 8), kvs=(None, "tq4"), steps: int = 2) -> None:
    """Prefill and a few static decode steps, every Triton dispatch taken (on CPU tensors)."""
    from wren import triton_ops
    from wren.graphs import StaticDecoder
    from wren.kv import make_kv_cache

    saved = triton_ops.takes
    triton_ops.takes = lambda x: True
    try:
        with torch.inference_mode():
            for batch in batches:
                for kv in kvs:
                    cache = make_kv_cache(wren_model, batch=batch, max_len=24, spec=kv)
                    ids = torch.randint(5, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(batch))
                    logits = wren_model(ids, cache, logits_to_keep=1)[:, -1]
                    step = StaticDecoder(wren_model, cache, graph=False)
                    for _ in range(steps):
                        logits = step(logits.nan_to_num().argmax(-1, keepdim=True).clamp(0, VOCAB - 1))
                    if kv is None:  # the one-token cache write of Gemma 3 (Gemma 4's head-norm kernel does its own)
                        layer = next(iter(cache.keys))
                        new = cache.keys[layer][:, :, :1].clone()
                        cache.update(layer, new, new.clone(), cache.positions(1))
            one_row_other_rates(wren_model.config.hidden_size)
    finally:
        triton_ops.takes = saved


def one_row_other_rates(width: int) -> None:
    """One row times 2- and 8-bit matrices (`wren quantize --bits 2`, an 8-bit LM head): the word GEMV, which
    the 4-bit models above never reach."""
    from wren.quant import triton_kernels
    from wren.quant.linear import TQLinear

    group = 128 if width % 128 == 0 else width
    x = torch.zeros(1, width, dtype=torch.bfloat16)
    for bits in (2, 8):
        layer = TQLinear(256, width, bits, group, seed=0)
        triton_kernels.tq_linear(x, layer.codes, layer.scales, layer.cfg)


# PyTorch ops that launch no kernel (views, metadata, allocation; `item` reads a host tensor here: the PLE ids)
_NO_KERNEL = {"view", "reshape", "as_strided", "expand", "slice", "select", "unsqueeze", "squeeze", "t", "transpose",
              "permute", "_unsafe_view", "alias", "detach", "detach_", "empty", "empty_like", "empty_strided", "split",
              "split_with_sizes", "narrow", "unbind", "view_as", "lift_fresh", "flatten", "_reshape_alias", "item"}


def step_launches(wren_model, kv: str | None) -> tuple[collections.Counter, collections.Counter]:
    """Kernels one static decode step launches at batch 1 (after a warm-up step): Triton's by kernel, and
    PyTorch's by op and the line of wren that called it. On a GPU each is a launch inside the graph; at
    a few microseconds each, their count bounds a step as much as the bytes do."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from wren import triton_ops
    from wren.graphs import StaticDecoder
    from wren.kv import make_kv_cache

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if name not in _NO_KERNEL and not (args and out is args[0] and name in ("to", "contiguous")):
                frames = [f for f in traceback.extract_stack() if "/wren/" in f.filename]
                where = f"{frames[-1].filename.split('/wren/')[-1]}:{frames[-1].lineno}" if frames else "?"
                self.ops[(name, where)] += 1
            return out

    saved = triton_ops.takes
    triton_ops.takes = lambda x: True
    try:
        with torch.inference_mode():
            cache = make_kv_cache(wren_model, batch=1, max_len=24, spec=kv)
            wren_model(torch.randint(5, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0)), cache,
                       logits_to_keep=1)
            step = StaticDecoder(wren_model, cache, graph=False)
            token = torch.tensor([[7]])
            step(token)
            first = len(launches)
            counter = Count()
            with counter:
                step(token)
            return collections.Counter(launches[first:]), counter.ops
    finally:
        triton_ops.takes = saved


def launch_table(shape: str, layers: int, counts: dict) -> str:
    lines = [f"### {shape}: kernels launched by one decode step (batch 1; {layers} decoder layers, the LM head, "
             "the embedding)", "",
             "| KV cache | Triton | PyTorch | in all | Triton, by kernel | PyTorch, by op and caller (the most) |",
             "|---|---|---|---|---|---|"]
    for kv, (triton_counts, torch_counts) in counts.items():
        by_kernel = ", ".join(f"{k} {v}" for k, v in triton_counts.most_common())
        by_op = ", ".join(f"{op} ({where}) {v}" for (op, where), v in torch_counts.most_common(8))
        t, p = sum(triton_counts.values()), sum(torch_counts.values())
        lines.append(f"| {kv or 'f16'} | {t} | {p} | {t + p} | {by_kernel} | {by_op} |")
    return "\n".join(lines)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(cubin: bytes) -> dict:
    """Registers, spilled (local) bytes and stack bytes a thread of a kernel, from cuobjdump. (A kernel whose
    values do not fit its registers can show no spill and still keep kilobytes on the stack: a float32
    tl.dot of a 128 x 128 matrix did, ~2,000 local loads and stores a thread.)"""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = dict(re.findall(r"(REG|LOCAL|STACK):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()}


def main_loop(cubin: bytes) -> list[str]:
    """The instructions of the longest loop (a backward branch's body) of a kernel's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    labels, instructions = {}, []
    for line in text.splitlines():
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(instructions)
        elif m := re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?);", line):
            instructions.append(m.group(1))
    longest: list[str] = []
    for i, ins in enumerate(instructions):
        m = re.search(r"BRA\s.*`\(\.(L_x_\d+)\)", ins)
        if m and labels.get(m.group(1), i) < i and i + 1 - labels[m.group(1)] > len(longest):
            longest = instructions[labels[m.group(1)]:i + 1]
    return longest


def _opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def rows(compiled: list) -> list[dict]:
    """One row per distinct compiled kernel."""
    out, seen = [], set()
    for name, kernel in compiled:
        if id(kernel) in seen:
            continue
        seen.add(id(kernel))
        constants = {kernel.src.fn.arg_names[path[0]]: value for path, value in kernel.src.constants.items()}
        loop = main_loop(kernel.asm["cubin"])
        ops = collections.Counter(_opcode(i) for i in loop)
        row = {"kernel": name, "warps": kernel.metadata.num_warps, "shared": kernel.metadata.shared,
               **resources(kernel.asm["cubin"]),
               "loop": len(loop), "barriers": ops.get("BAR", 0), "constants": constants,
               "top": ", ".join(f"{k} {v}" for k, v in ops.most_common(5))}
        codes = codes_a_trip(name, constants)
        if codes and loop:  # weight codes a thread takes a trip: its share of the tile
            row["per_code"] = len(loop) / (codes / (32 * row["warps"]))
        out.append(row)
    return out


def codes_a_trip(kernel: str, constants: dict) -> int:
    """Weight codes one trip of a weight kernel's main loop covers (0 for other kernels)."""
    if kernel == "_tq_gemv_row":  # 32-bit words of 8 codes
        return constants["BLOCK_N"] * constants["BLOCK_W"] * 8
    if kernel == "_tq_gemv":
        return constants["BLOCK_N"] * constants["BLOCK_W"] * 32 // constants["BITS"]
    if kernel == "_tq_aligned":  # bytes
        return constants["BLOCK_N"] * constants["BLOCK_B"] * 8 // constants["BITS"]
    return 0


def _shape_text(constants: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in constants.items() if k.isupper() and isinstance(v, (int, bool)))


def table(shape: str, found: list[dict]) -> str:
    lines = [f"### {shape}", "", "| kernel | constants | warps | registers | spilled B | stack B | shared B | "
             "loop instr | per code | barriers in loop | commonest in loop |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        per_code = f"{r['per_code']:.1f}" if "per_code" in r else ""
        lines.append(f"| {r['kernel']} | {_shape_text(r['constants'])} | {r['warps']} | {r.get('reg', '?')} | "
                     f"{r.get('local', '?')} | {r.get('stack', '?')} | {r.get('shared', '?')} | {r['loop']} | "
                     f"{per_code} | {r['barriers']} | {r['top']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["31b", "e2b"], choices=sorted(SHAPES))
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 89, 80")
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel failed (or fell back)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 runs kernels on the CPU instead of compiling them: unset it", file=sys.stderr)
        return 2
    from wren import triton_ops

    print(f"# wren's Triton kernels compiled for sm_{args.arch} (nothing run; counted, not timed)\n")
    for shape in args.shapes:
        with compile_only(args.arch) as compiled:
            wren_model = model(shape)
            decode(wren_model)
            counts = {kv: step_launches(wren_model, kv) for kv in (None, "tq4")}
        print(launch_table(shape, len(wren_model.layers), counts) + "\n")
        print(table(shape, rows(compiled)) + "\n")
    if triton_ops.broken:
        for kernel, error in triton_ops.broken.items():
            print(f"FAILED {kernel}: {error}", file=sys.stderr)
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
