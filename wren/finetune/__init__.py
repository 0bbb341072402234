"""LoRA fine-tuning on a dense or TurboQuant base: data (`data`), adapters (`lora`), the loss without full
logits (`loss`), the loop with checkpoints (`train`), PEFT-format files (`peft_io`), merging (`merge`), the
loss plot (`plot`) and the `wren finetune` / `wren merge` commands (`command`).

Nothing here imports torch at package import, so the CLI stays quick to start.
"""

from .config import DEFAULT_TARGETS, TrainConfig

__all__ = ["DEFAULT_TARGETS", "TrainConfig"]
