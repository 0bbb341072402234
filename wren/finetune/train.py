"""The LoRA training loop: AdamW, cosine schedule with warmup, gradient accumulation, eval loss at
intervals, checkpoints that resume to the very weights an uninterrupted run reaches, and Ctrl-C.

A checkpoint holds the adapter, the optimizer moments, the step count, the RNG state and the loss history,
in safetensors + JSON (nothing is pickled). The batches of a step are a function of (seed, step) alone
(`data.epoch_order`), and checkpoints are only taken between optimizer steps, so resuming replays exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import BadOptionError, ModelFormatError
from ..quant.cpu_kernels import release_free_memory
from . import data as D
from . import lora
from .config import TrainConfig
from .loss import causal_lm_loss, checkpoint_layers

CHECKPOINT = "checkpoint"


@dataclass
class TrainResult:
    steps: int
    interrupted: bool
    history: list = field(default_factory=list)  # [step, loss, lr, tokens/s]
    evals: list = field(default_factory=list)  # [step, eval loss]
    seconds: float = 0.0
    tokens: int = 0


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then a cosine down to cfg.lr * min_lr_ratio at the last step."""
    warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, total - warm)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def prepare(model, cfg: TrainConfig) -> list[str]:
    """Freeze the base, add the adapters (seeded), and turn on gradient checkpointing if asked."""
    torch.manual_seed(cfg.seed)
    names = lora.inject(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)
    checkpoint_layers(model, cfg.grad_checkpointing)
    return names


def rows(dataset: D.Dataset, cfg: TrainConfig) -> list[D.Example]:
    return D.pack(dataset.examples, cfg.max_len) if cfg.packing else dataset.examples


def _fingerprint(examples: list[D.Example], cfg: TrainConfig) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(torch.tensor(e.ids, dtype=torch.int64).numpy().tobytes())
        h.update(bytes(e.mask))
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("eval_every", "save_every", "grad_checkpointing")}
    h.update(json.dumps(keep, sort_keys=True, default=list).encode())
    return h.hexdigest()[:16]


def evaluate(model, examples: list[D.Example], pad_id: int, batch_size: int) -> float:
    """Mean loss per target token over examples."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            ids, targets, mask = D.collate(examples[s:s + batch_size], pad_id)
            device = next(iter(lora.lora_modules(model).values())).lora_A.device
            loss, k = causal_lm_loss(model, ids.to(device), targets.to(device), mask.to(device))
            total, n = total + float(loss), n + k
    model.train(was_training)
    return total / max(1, n)


class _StopFlag:
    """Ctrl-C during training asks for a stop at the next step boundary (a second one stops at once)."""

    def __init__(self):
        self.stop = False
        self._saved = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._saved = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        if self._saved is not None:
            signal.signal(signal.SIGINT, self._saved)


def train(model, train_rows: list[D.Example], cfg: TrainConfig, out_dir: Path, *, pad_id: int = 0,
          eval_rows: list[D.Example] | None = None, resume: bool = False, progress=None,
          stop_after: int | None = None) -> TrainResult:
    """Train the adapters already injected in `model` (see `prepare`). Checkpoints go to out_dir/checkpoint.
    `progress(info)` is called after every step; `stop_after` stops (with a checkpoint) after that many
    steps, as Ctrl-C does. Returns the loss history."""
    cfg.check()
    out_dir = Path(out_dir)
    params = lora.lora_state(model)
    device = next(iter(params.values())).device
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(math.ceil(len(train_rows) / cfg.batch_size) / cfg.grad_accum)
    total = cfg.steps or per_epoch * cfg.epochs
    fingerprint = _fingerprint(train_rows, cfg)
    result = TrainResult(0, False)
    if resume and (out_dir / CHECKPOINT).is_dir():
        result = load_checkpoint(out_dir / CHECKPOINT, params, opt, fingerprint)
    elif resume:
        raise BadOptionError(f"--resume: there is no checkpoint in {out_dir / CHECKPOINT}")
    step = result.steps
    epoch_batches: dict[int, list] = {}
    model.train()
    t_start = time.perf_counter() - result.seconds
    with _StopFlag() as flag:
        while step < total:
            epoch, k = divmod(step, per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: D.batches(train_rows, cfg.batch_size, cfg.seed, epoch)}
            group = epoch_batches[epoch][k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
            t0 = time.perf_counter()
            loss, tokens = _step(model, group, pad_id, device)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            release_free_memory()  # the step's freed temporaries, back to the OS before the next one
            step += 1
            rate = tokens / max(1e-9, time.perf_counter() - t0)
            result.steps, result.tokens = step, result.tokens + tokens
            result.history.append([step, loss, lr, rate])
            if eval_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                result.evals.append([step, evaluate(model, eval_rows, pad_id, cfg.batch_size)])
            result.seconds = time.perf_counter() - t_start
            if progress:
                progress({"step": step, "total": total, "loss": loss, "lr": lr, "tokens_per_s": rate,
                          "eval": result.evals[-1][1] if result.evals and result.evals[-1][0] == step else None})
            stopping = flag.stop or (stop_after is not None and step >= stop_after)
            if stopping or step == total or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(out_dir / CHECKPOINT, params, opt, result, fingerprint, _rng_state(device))
            if stopping and step < total:
                result.interrupted = True
                break
    model.eval()
    return result


def _step(model, group: list[list[D.Example]], pad_id: int, device) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step; the loss is the mean over all
    their target tokens, so accumulation gives the same gradient as one big batch."""
    batches = [D.collate(b, pad_id) for b in group]
    n_targets = sum(int(m.sum()) for _, _, m in batches)
    total, tokens = 0.0, 0
    for (ids, targets, mask), examples in zip(batches, group):
        loss, _ = causal_lm_loss(model, ids.to(device), targets.to(device), mask.to(device))
        (loss / max(1, n_targets)).backward()
        total += loss.detach().item()
        tokens += sum(len(e.ids) for e in examples)  # real tokens, padding not counted
    return total / max(1, n_targets), tokens


# --- checkpoints ---------------------------------------------------------------------------------------


def _rng_state(device) -> dict[str, torch.Tensor]:
    """The generators dropout draws from: the CPU one, and the device's on CUDA."""
    state = {"rng": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(folder: Path, params: dict, opt, result: TrainResult, fingerprint: str, rng: dict) -> None:
    """Adapter + optimizer moments + RNG + history, written to a temp folder and renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"lora.{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    names = list(params)
    state = opt.state_dict()["state"]
    for i, s in state.items():
        for key, value in s.items():
            tensors[f"optim.{names[i]}.{key}"] = torch.as_tensor(value).detach().cpu().reshape(-1).clone()
    tensors.update({k: v.cpu().clone() for k, v in rng.items()})
    meta = {"steps": result.steps, "history": result.history, "evals": result.evals, "seconds": result.seconds,
            "tokens": result.tokens, "fingerprint": fingerprint}
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        for f in tmp.iterdir():
            f.unlink()
    else:
        tmp.mkdir()
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        if old.exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_checkpoint(folder: Path, params: dict, opt, fingerprint: str) -> TrainResult:
    """Restore a checkpoint into params and opt (and the RNG); refuse one made with other data or settings."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(folder / "state.safetensors")
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelFormatError(f"the checkpoint in {folder} is unreadable ({exc}); delete it to start over") from None
    if meta.get("fingerprint") != fingerprint:
        raise BadOptionError(f"the checkpoint in {folder} was made with other data or settings; "
                             f"use the same ones to resume, or delete it to start over")
    names = list(params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"lora.{k}"])
    state = {}
    for i, name in enumerate(names):
        prefix = f"optim.{name}."
        s = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
        if s:
            s = {key: (t.reshape(()) if key == "step" else t.reshape(params[name].shape)) for key, t in s.items()}
            state[i] = s
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors["rng"])
    device = next(iter(params.values())).device
    if "rng_cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng_cuda"], device)
    return TrainResult(meta["steps"], False, meta["history"], meta["evals"], meta["seconds"], meta["tokens"])
