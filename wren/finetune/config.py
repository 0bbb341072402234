"""Fine-tuning settings: a dataclass with the defaults `wren finetune` shows (no torch import, so the CLI
starts fast)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadOptionError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 2e-4
    warmup: float = 0.05  # a fraction of the steps (< 1) or a number of steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 512
    packing: bool = False
    seed: int = 0
    grad_checkpointing: bool = False
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: only at the end (and on Ctrl-C)

    def check(self) -> None:
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise BadOptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise BadOptionError(f"--steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise BadOptionError(f"--lr must be positive, got {self.lr}")
