"""The `wren` command: run, show, quantize, perplexity (more arrive with the server and the fine-tuner).

The CLI only translates between the terminal and the engine. Errors a user can cause are printed as one
line, without a traceback, and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import WrenError
from .finetune import command as finetune_commands
from .store import commands as store_commands

GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at "
                "ai.google.dev/gemma/terms")
SAMPLING_FLAGS = [("temperature", float), ("top-k", int), ("top-p", float), ("min-p", float),
                  ("repeat-penalty", float), ("repeat-last-n", int), ("presence-penalty", float),
                  ("frequency-penalty", float), ("seed", int), ("num-predict", int), ("num-ctx", int)]


def _add_sampling(p: argparse.ArgumentParser) -> None:
    for flag, kind in SAMPLING_FLAGS:
        p.add_argument(f"--{flag}", type=kind, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _options(args) -> dict:
    opts = {flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, _ in SAMPLING_FLAGS}
    opts["stop"] = args.stop
    return {k: v for k, v in opts.items() if v is not None}


KV_HELP = ("KV cache type: f32, f16, bf16, q8, tq4, tq3.5, tq3, tq2.5, tq2, or KEYS/VALUES such as tq4/tq3 "
           "(default: the model's PARAMETER kv_cache, else $WREN_KV_CACHE, else dense in the model's dtype)")
EXACT_HELP = ("run a GGUF's quantized weights dequantized to float32, exactly, instead of as int8 levels "
              "(slower; the levels are within ~1%% of them)")
LOW_MEMORY_HELP = ("read a GGUF's linear layers in their own block formats, where the file holds them, instead "
                   "of as int8 levels: their file's footprint in memory, nothing converted or cached for them, "
                   "decoding as fast or faster, prompts ~0.8x as fast")


def warn_unmet(model) -> None:
    """Say on stderr when --low-memory could not be honoured (notes that start with the flag)."""
    for note in getattr(model, "notes", ()):
        if note.startswith("--low-memory:"):
            print(f"warning: {note}", file=sys.stderr)


def weight_flags(args) -> tuple[bool, bool]:
    """(int8, in_place) for wren.load from --exact-weights and --low-memory, which contradict each other."""
    exact, low = bool(getattr(args, "exact_weights", False)), bool(getattr(args, "low_memory", False))
    if exact and low:
        raise WrenError("--exact-weights and --low-memory ask for two different ways to hold the weights; give one")
    return not exact, low


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wren", description="Run Gemma models on this machine.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a prompt, or chat when no prompt is given")
    run.add_argument("words", nargs="*", metavar="[MODEL] [PROMPT]",
                     help="MODEL is a model name, a folder or a .gguf path (omit it for the default model)")
    run.add_argument("--system", help="system prompt")
    run.add_argument("--raw", action="store_true", help="complete the prompt as plain text, no chat template")
    run.add_argument("--think", action="store_true", help="let a Gemma 4 model think before answering")
    run.add_argument("--verbose", action="store_true", help="print timings after each answer")
    run.add_argument("--kv-cache", default=None, metavar="TYPE", help=KV_HELP)
    run.add_argument("--exact-weights", action="store_true", help=EXACT_HELP)
    run.add_argument("--low-memory", action="store_true", help=LOW_MEMORY_HELP)
    _add_sampling(run)
    show = sub.add_parser("show", help="describe a model")
    show.add_argument("model", nargs="?", default=None)
    show.add_argument("--license", action="store_true", help="print the licence text only")
    store_commands.add_show_flags(show)
    quant = sub.add_parser("quantize", help="compress a model's weights with TurboQuant (no calibration data)")
    quant.add_argument("model", nargs="?", default=None)
    quant.add_argument("--bits", type=float, required=True, help="bits per weight of the linear layers (1-8)")
    quant.add_argument("--group-size", type=int, default=128,
                       help="weights per scale along the input dim (default 128); 0 = a whole row")
    quant.add_argument("--embed-bits", type=float, default=8, help="bits of the embedding / tied LM head")
    quant.add_argument("--seed", type=int, default=0, help="rotation seed (stored in the output)")
    quant.add_argument("--module-bits", action="append", default=None, metavar="PATTERN=BITS",
                       help="other bits for the layers whose name matches: absolute ('*.v_proj=5') or relative "
                            "to --bits ('*.v_proj=+2'); repeatable; default '*.v_proj=+2' (--uniform: none)")
    quant.add_argument("--uniform", action="store_true", help="every linear layer at --bits")
    quant.add_argument("--no-input-scales", action="store_true",
                       help="skip the data-free column scaling (plain TurboQuant)")
    quant.add_argument("-o", "--output", required=True, help="output folder (must not exist or be empty)")
    quant.add_argument("--quiet", action="store_true")
    bench = sub.add_parser("bench", help="prefill / decode tokens/s, time to first token, peak memory and "
                                         "the bandwidth limit of a model as loaded")
    bench.add_argument("model", nargs="?", default=None)
    bench.add_argument("--prompt", type=int, default=512, help="prompt tokens (seeded random ids; default 512)")
    bench.add_argument("--gen", type=int, default=64, help="tokens to decode (default 64)")
    bench.add_argument("--repeat", type=int, default=3, help="timed runs; medians are shown (default 3)")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads (default: the physical cores)")
    bench.add_argument("--kv-cache", default=None, metavar="TYPE", help=KV_HELP)
    bench.add_argument("--exact-weights", action="store_true", help=EXACT_HELP)
    bench.add_argument("--low-memory", action="store_true", help=LOW_MEMORY_HELP)
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    ppl = sub.add_parser("perplexity", help="perplexity over a text file, as llama.cpp measures it")
    ppl.add_argument("model", nargs="?", default=None)
    ppl.add_argument("--file", required=True, help="a UTF-8 text file")
    ppl.add_argument("--ctx", type=int, default=512)
    ppl.add_argument("--chunks", type=int, default=None, help="evaluate only the first N windows")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.add_argument("--kv-cache", default=None, metavar="TYPE", help=KV_HELP)
    ppl.add_argument("--int8", action="store_true",
                     help="measure a GGUF's weights as the int8 levels `wren run` holds (default: exact, float32)")
    ppl.add_argument("--low-memory", action="store_true",
                     help="measure a GGUF's linear layers read in their block formats, as `wren run --low-memory`")
    store_commands.add_parsers(sub)
    finetune_commands.add_parsers(sub)
    serve = sub.add_parser("serve", help="Ollama- and OpenAI-compatible HTTP API (default 127.0.0.1:11435)")
    serve.add_argument("--host", help="address[:port] to bind (env WREN_HOST)")
    serve.add_argument("--port", type=int, help="port (default 11435)")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY (env WREN_API_KEY)")
    serve.add_argument("--cors-origin", action="append", help="an extra allowed CORS origin (repeatable)")
    serve.add_argument("--max-queue", type=int, help="requests that may wait for a slot before 503 (512)")
    serve.add_argument("--parallel", type=int, help="sequences decoded together per model (4)")
    serve.add_argument("--max-loaded-models", type=int, help="models kept in memory at once (3)")
    serve.add_argument("--keep-alive", help="how long an idle model stays loaded (5m; -1 forever)")
    serve.add_argument("--kv-cache", default=None, metavar="TYPE", help=KV_HELP + "; a request's options.kv_cache wins")
    serve.add_argument("--exact-weights", action="store_true", help=EXACT_HELP)
    serve.add_argument("--low-memory", action="store_true", help=LOW_MEMORY_HELP)
    return parser


def _version() -> str:
    from . import __version__
    return f"wren {__version__}"


def _split_model_prompt(words: list[str]) -> tuple[str | None, str | None]:
    """`wren run PROMPT`, `wren run MODEL` or `wren run MODEL PROMPT`: a first word that names an existing
    path or the default model is the model."""
    from .weights.load import DEFAULT_MODEL

    if not words:
        return None, None
    first = words[0]
    if (first in (DEFAULT_MODEL, "default") or Path(first).expanduser().exists()
            or store_commands.stored_model(first)):
        return first, " ".join(words[1:]) or None
    if len(words) > 1 and (first.endswith(".gguf") or "/" in first):
        raise WrenError(f"no model at {first}: give an HF folder, a .gguf file, or omit it for the default")
    return None, " ".join(words)


def cmd_run(args) -> int:
    import wren
    from .sampling import Options

    source, prompt = _split_model_prompt(args.words)
    if sys.stdin is not None and not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped.strip():
            prompt = f"{prompt}\n\n{piped}" if prompt else piped
    opts = Options.from_dict(_options(args))
    t0 = time.perf_counter()
    int8, in_place = weight_flags(args)
    model = wren.load(source, int8=int8, in_place=in_place)
    warn_unmet(model)
    load_seconds = time.perf_counter() - t0
    if getattr(model, "defaults", None):  # a stored model's PARAMETERs; flags given here win
        opts = Options.from_dict({**model.defaults, **_options(args)})
    if args.system is None:
        args.system = getattr(model, "system", None)
    if prompt is not None and getattr(model, "messages", None) and not args.raw:
        prompt = [*model.messages, {"role": "user", "content": prompt}]
    if model.tokenizer is None:
        raise WrenError(f"{model.source} has no tokenizer (tokenizer.json or GGUF vocabulary)")
    if prompt is not None:
        _answer(model, prompt, opts, args, load_seconds)
        return 0
    return _chat_loop(model, opts, args, load_seconds)


def _answer(model, prompt, opts, args, load_seconds: float) -> str:
    from .generation import stream_text

    stats: list = []
    t0 = time.perf_counter()
    pieces = []
    for piece in stream_text(model, prompt, opts, system=args.system, raw=args.raw, think=args.think,
                             stats_out=stats, kv_cache=getattr(args, "kv_cache", None)):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose and stats:
        _print_timings(stats[0], time.perf_counter() - t0 + load_seconds, load_seconds)
    return "".join(pieces)


def _print_timings(s, total: float, load: float) -> None:
    lines = [("total duration", f"{total:.3f}s"), ("load duration", f"{load:.3f}s"),
             ("prompt eval count", f"{s.prompt_tokens} token(s)"),
             ("prompt eval duration", f"{s.prompt_seconds:.3f}s"),
             ("prompt eval rate", f"{s.prompt_rate:.2f} tokens/s"),
             ("eval count", f"{s.generated_tokens} token(s)"), ("eval duration", f"{s.generate_seconds:.3f}s"),
             ("eval rate", f"{s.eval_rate:.2f} tokens/s")]
    for name, value in lines:
        print(f"{name + ':':<22}{value}", file=sys.stderr)


def _chat_loop(model, opts, args, load_seconds: float) -> int:
    history: list[dict] = list(getattr(model, "messages", None) or [])
    print("Send a message (/? for help, /bye to quit)", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.startswith('"""'):
            line = _read_multiline(line[3:])
        command = line.strip()
        if command in ("/bye", "/exit"):
            return 0
        if command == "/clear":
            history[:] = list(getattr(model, "messages", None) or [])
            print("Cleared session context", file=sys.stderr)
            continue
        if command in ("/?", "/help"):
            print('/bye quit · /clear forget the conversation · """ starts and ends multi-line input',
                  file=sys.stderr)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _answer(model, history, opts, args, load_seconds)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
        load_seconds = 0.0


def _read_multiline(first: str) -> str:
    lines = [first] if first else []
    while True:
        try:
            line = input("... ")
        except EOFError:
            break
        if line.endswith('"""'):
            lines.append(line[:-3])
            break
        lines.append(line)
    return "\n".join(lines)


def cmd_show(args) -> int:
    import wren
    from .kv import context_for_budget, kv_bytes_per_token, kv_cache_bytes, resolve_types, spec_name
    from .models import param_count

    if store_commands.wants_store_view(args):
        return store_commands.cmd_show_store(args)
    model = wren.load(args.model)
    cfg = model.config
    license_text = model.license
    if args.license:
        print(GEMMA_NOTICE if license_text in (None, "gemma") else license_text)
        return 0
    effective, total = param_count(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    table = model.embed_tokens_per_layer
    kv_types = resolve_types(model, args.kv_cache or getattr(model, "kv_cache", None))
    ctx_4k = min(4096, cfg.max_position_embeddings)
    rows = [
        ("architecture", cfg.model_type), ("source", str(model.source)),
        ("parameters", f"{effective / 1e6:.1f}M" + (f" ({total / 1e6:.1f}M with PLE)" if table else "")),
        ("layers", f"{cfg.num_hidden_layers} ({sum(s.kind == 'full_attention' for s in model.specs)} full, "
                   f"window {cfg.sliding_window})"),
        ("embedding length", str(cfg.hidden_size)), ("context length", str(cfg.max_position_embeddings)),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in sorted(model.tensor_types.items()))),
        ("memory (weights)", _mib(weight_bytes)),
        ("KV cache", f"{spec_name(kv_types)}: {_mib(kv_cache_bytes(model, kv_types, 1, ctx_4k))} at {ctx_4k} ctx, "
                     f"{_mib(kv_cache_bytes(model, kv_types, 1, cfg.max_position_embeddings))} at "
                     f"{cfg.max_position_embeddings}, {kv_bytes_per_token(model, kv_types)} bytes/token; "
                     f"1 GiB holds {context_for_budget(model, kv_types, 1 << 30)} tokens"),
    ]
    if table is not None:
        rows.append(("PLE table (mapped)", _mib(table.nbytes())))
    rows.append(("license", GEMMA_NOTICE if license_text in (None, "gemma") else license_text.splitlines()[0]))
    for note in model.notes:
        rows.append(("note", note))
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        print(f"  {key:<{width}}{value}")
    return 0


def cmd_quantize(args) -> int:
    import wren
    from .quant import folder

    items = () if args.uniform else args.module_bits if args.module_bits is not None else folder.DEFAULT_MODULE_BITS
    module_bits = folder.parse_module_bits(args.bits, items)
    model = wren.load(args.model)
    out = Path(args.output)
    with _progress(args.quiet, "quantizing") as update:
        recipe = folder.quantize_model(model, args.bits, args.group_size, args.embed_bits, args.seed, update,
                                       input_scales=not args.no_input_scales, module_bits=module_bits)
    folder.save(model, out)
    n_modules = len(recipe["modules"])
    group = args.group_size or "row"
    print(f"wrote {out}: {n_modules} tensors at {args.bits:g} bits (group {group}), "
          f"{folder.linear_bits_per_weight(model):.3f} bits/weight in the linear layers, "
          f"{_mib(folder.file_bytes(out))} on disk")
    return 0


def cmd_perplexity(args) -> int:
    import json

    import wren
    from .perplexity import perplexity
    from .quant import folder

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WrenError(f"cannot read {args.file} as UTF-8 text: {exc}") from None
    model = wren.load(args.model, int8=args.int8 or args.low_memory, in_place=args.low_memory)
    warn_unmet(model)
    ids = model.tokenizer.encode(text)
    with _progress(args.json, "perplexity") as update:
        result = perplexity(model, ids, ctx=args.ctx, chunks=args.chunks, kv_cache=args.kv_cache,
                            progress=lambda i, n, p: update(i, n, f"ppl {p:.3f}"))
    if args.json:
        weights = "low-memory" if args.low_memory else "int8" if args.int8 else "exact"
        out = result.as_dict() | {"bits_per_weight": folder.linear_bits_per_weight(model),
                                  "file_bytes": folder.file_bytes(model.source), "weights": weights}
        print(json.dumps(out))
    else:
        print(f"Final estimate: PPL = {result.perplexity:.4f} +/- {result.error:.5f} "
              f"({result.tokens} tokens scored, {result.chunks} chunks of {result.ctx})")
    return 0


class _progress:
    """A rich progress bar on stderr, or nothing when quiet; yields update(done, total, label)."""

    def __init__(self, quiet: bool, title: str):
        self.quiet, self.title, self.bar = quiet, title, None

    def __enter__(self):
        if self.quiet:
            return lambda *a: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.title, total=None)
        return lambda done, total, label="": self.bar.update(task, completed=done, total=total,
                                                               description=f"{self.title} {label}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def cmd_bench(args) -> int:
    import json

    import torch

    import wren
    from .speed import bench, default_threads

    torch.set_num_threads(args.threads or default_threads())
    t0 = time.perf_counter()
    int8, in_place = weight_flags(args)
    model = wren.load(args.model, int8=int8, in_place=in_place)
    warn_unmet(model)
    load_s = time.perf_counter() - t0
    r = {"model": args.model or "the default model", "load_s": load_s,
         **bench(model, args.prompt, args.gen, args.repeat, kv_cache=args.kv_cache)}
    if args.json:
        print(json.dumps(r))
        return 0
    rss = r["peak_rss_bytes"]
    print(f"model      {r['model']}  (loaded in {load_s:.2f} s, {r['threads']} threads, {r['device']})")
    print(f"prefill    {r['prefill_tok_s']:8.1f} tokens/s   ({r['prompt_tokens']} tokens, "
          f"time to first token {r['ttft_s']:.3f} s)")
    print(f"decode     {r['decode_tok_s']:8.1f} tokens/s   ({r['gen_tokens']} tokens, median of {r['repeat']})")
    print(f"limit      {r['limit_tok_s']:8.1f} tokens/s   ({r['bandwidth_bytes_s'] / 1e9:.1f} GB/s copy bandwidth / "
          f"{_mib(r['weight_bytes_per_token'])} of weights + the {r['kv_cache']} KV cache read per token); "
          f"decode at {100 * r['decode_tok_s'] / r['limit_tok_s']:.0f}% of it")
    print(f"peak RSS   {_mib(rss) if rss else 'unknown'}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "show": cmd_show, "quantize": cmd_quantize, "perplexity": cmd_perplexity,
                "bench": cmd_bench,
                **store_commands.HANDLERS, **finetune_commands.HANDLERS,
                "serve": lambda a: __import__("wren.server").server.serve(a)}
    try:
        return handlers[args.command](args)
    except WrenError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
