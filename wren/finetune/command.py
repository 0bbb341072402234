"""`wren finetune` and `wren merge`: argument parsing and the two handlers (the CLI only registers them).

    wren finetune BASE --data train.jsonl [--eval eval.jsonl] -o NAME
    wren merge NAME -o MERGED [--bits B]

A fine-tune works in a folder of its own (default: `finetune/NAME` beside the model store): the adapter in
PEFT's format in `adapter/`, `loss.png` beside it, and `checkpoint/` for `--resume`. The result is registered
in the store as NAME = FROM base + ADAPTER adapter/, so `wren run NAME` and the server use it at once.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..errors import BadOptionError

HELP = "LoRA fine-tune a model (dense or TurboQuant base) on JSONL chats; registers BASE+adapter as NAME"


def add_parsers(sub) -> None:
    from .config import DEFAULT_TARGETS, TrainConfig

    d = TrainConfig()
    ft = sub.add_parser("finetune", help=HELP)
    ft.add_argument("base", nargs="?", default=None, help="model name, folder or .gguf (omit: the default model)")
    ft.add_argument("--data", required=True, help="training JSONL: {messages}, {prompt, completion} or {text}")
    ft.add_argument("--eval", default=None, help="held-out JSONL for the eval loss")
    ft.add_argument("-o", "--output", required=True, metavar="NAME", help="store name of the fine-tuned model")
    ft.add_argument("--dir", default=None, help="working folder (default: finetune/NAME beside the store)")
    ft.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    ft.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    ft.add_argument("--dropout", type=float, default=d.dropout, help=f"LoRA dropout (default {d.dropout:g})")
    ft.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help="comma-separated linear layer names to adapt (default: all attention and MLP)")
    ft.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    ft.add_argument("--warmup", type=float, default=d.warmup,
                    help="warmup: a fraction of the steps (<1) or a number of steps (default 0.05)")
    ft.add_argument("--epochs", type=int, default=d.epochs)
    ft.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ft.add_argument("--batch-size", type=int, default=d.batch_size)
    ft.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    ft.add_argument("--max-len", type=int, default=d.max_len, help="tokens per example (longer ones are cut)")
    ft.add_argument("--packing", action="store_true", help="pack several examples into each row")
    ft.add_argument("--seed", type=int, default=d.seed)
    ft.add_argument("--grad-checkpointing", action="store_true", help="recompute layers in backward: less memory")
    ft.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (default: at the end)")
    ft.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    ft.add_argument("--resume", action="store_true", help="continue from the working folder's checkpoint")
    ft.add_argument("--skip-bad", action="store_true", help="skip (and count) bad JSONL lines")
    ft.add_argument("--train-on-prompt", action="store_true", help="learn the whole chat, not only replies")
    ft.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    ft.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ft.add_argument("--quiet", action="store_true")
    mg = sub.add_parser("merge", help="fold a fine-tuned model's adapter into its weights (and re-quantize)")
    mg.add_argument("name", help="a model with an ADAPTER, e.g. one `wren finetune` made")
    mg.add_argument("-o", "--output", required=True, metavar="MERGED", help="store name of the merged model")
    mg.add_argument("--bits", type=float, default=None, help="re-quantize with TurboQuant at this many bits")
    mg.add_argument("--group-size", type=int, default=128)
    mg.add_argument("--embed-bits", type=float, default=8)
    mg.add_argument("--folder", default=None, help="also keep the merged model folder here")


def work_dir(name: str, given: str | None) -> Path:
    if given:
        return Path(given).expanduser()
    from ..store import ModelStore

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return ModelStore().root.parent / "finetune" / slug


class ProgressBar:
    """One line on stderr: step, a bar, loss, learning rate, tokens/s (and the last eval loss)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet, self.stream = quiet, stream or sys.stderr
        self.last_eval = None

    def __call__(self, info: dict) -> None:
        if info.get("eval") is not None:
            self.last_eval = info["eval"]
        if self.quiet:
            return
        done, total = info["step"], info["total"]
        filled = int(24 * done / total)
        line = (f"\r{done:>5}/{total} [{'#' * filled}{'.' * (24 - filled)}] loss {info['loss']:.4f} "
                f"lr {info['lr']:.2e} {info['tokens_per_s']:.0f} tok/s")
        if self.last_eval is not None:
            line += f" eval {self.last_eval:.4f}"
        self.stream.write(line)
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def cmd_finetune(args) -> int:
    import torch

    import wren
    from . import data as D
    from . import lora, peft_io, plot
    from .config import TrainConfig
    from .train import prepare, rows, train

    if args.threads:
        torch.set_num_threads(args.threads)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets, lr=args.lr,
                      warmup=args.warmup, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, max_len=args.max_len, packing=args.packing, seed=args.seed,
                      grad_checkpointing=args.grad_checkpointing, eval_every=args.eval_every,
                      save_every=args.save_every)
    cfg.check()
    D.check_file(args.data)
    D.check_file(args.eval)
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise BadOptionError(f"--device {args.device}: use cpu, or cuda on a machine with a CUDA GPU")
    model = wren.load(args.base, device=args.device)
    if lora.lora_modules(model):
        raise BadOptionError(f"{args.base} already carries an adapter over quantized layers; "
                             f"`wren merge` it first and fine-tune the merged model")
    if model.tokenizer is None:
        raise BadOptionError(f"{args.base} has no tokenizer; fine-tuning needs one")
    train_set = D.load_jsonl(args.data, model.tokenizer, model, cfg.max_len, args.skip_bad, args.train_on_prompt)
    eval_set = (D.load_jsonl(args.eval, model.tokenizer, model, cfg.max_len, args.skip_bad, args.train_on_prompt)
                if args.eval else None)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    say(f"{len(train_set.examples)} training examples ({train_set.tokens} tokens)"
        + (f", {train_set.skipped} bad line(s) skipped" if train_set.skipped else "")
        + (f", {train_set.truncated} cut to {cfg.max_len} tokens" if train_set.truncated else ""))
    names = prepare(model, cfg)
    out = work_dir(args.output, args.dir)
    out.mkdir(parents=True, exist_ok=True)
    pad = model.tokenizer.token_to_id("<pad>") or 0
    t0 = time.perf_counter()
    result = train(model, rows(train_set, cfg), cfg, out, pad_id=pad,
                   eval_rows=rows(eval_set, cfg) if eval_set else None, resume=args.resume,
                   progress=ProgressBar(args.quiet))
    plot.loss_curve(out / "loss.png", [(h[0], h[1]) for h in result.history], [tuple(e) for e in result.evals])
    if result.interrupted:
        print(f"\ninterrupted after step {result.steps}: checkpoint in {out / 'checkpoint'}; "
              f"rerun with --resume to continue", file=sys.stderr)
        return 130
    base_ref = getattr(model, "store_name", None) or str(model.source)
    config = peft_io.adapter_config(cfg.rank, cfg.alpha, cfg.dropout, {n.rsplit(".", 1)[-1] for n in names},
                                    base=base_ref)
    adapter = peft_io.save_adapter(model, out / "adapter", config)
    from ..store import ModelStore

    registered = ModelStore().create(args.output, f"FROM {base_ref}\nADAPTER {adapter}\n", base_dir=out)
    evals = f", eval loss {result.evals[-1][1]:.4f}" if result.evals else ""
    print(f"trained {len(names)} layers for {result.steps} steps in {time.perf_counter() - t0:.1f}s "
          f"(loss {result.history[-1][1]:.4f}{evals}); adapter in {adapter}, loss curve {out / 'loss.png'}; "
          f"`wren run {registered}` uses it")
    return 0


def cmd_merge(args) -> int:
    import wren
    from ..quant import folder as quant_folder
    from ..store import ModelStore
    from . import merge as M

    model = wren.load(args.name)
    if not getattr(model, "adapters", None):
        raise BadOptionError(f"{args.name} has no adapter to merge")
    seed = (model.quant_recipe or {}).get("seed", 0)  # merging drops the recipe: keep the base's rotation seed
    M.merge_all(model)
    if args.bits is not None:  # the recipe `wren quantize --bits` writes by default
        quant_folder.quantize_model(model, args.bits, args.group_size, args.embed_bits, seed=seed,
                                    module_bits=quant_folder.parse_module_bits(args.bits))
    keep = Path(args.folder).expanduser() if args.folder else None
    tmp = Path(tempfile.mkdtemp(prefix=".wren-merge-"))
    target = keep or tmp / "merged"
    try:
        if args.bits is not None:
            quant_folder.save(model, target)
        else:
            M.save_dense(model, target)
        name = ModelStore().pull(str(target), name=args.output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = f"re-quantized at {args.bits:g} bits" if args.bits is not None else "dense"
    print(f"merged {args.name} into {name} ({what})")
    return 0


HANDLERS = {"finetune": cmd_finetune, "merge": cmd_merge}
