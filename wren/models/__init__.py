"""Registry of model families: model_type -> the class that builds it from its config."""

from .gemma3 import Gemma3
from .gemma4 import Gemma4

ARCHITECTURES = {"gemma3": Gemma3, "gemma4": Gemma4}


def param_count(model) -> tuple[int, int]:
    """(effective parameters, parameters including Gemma 4's memory-mapped per-layer embedding table)."""
    effective = sum(p.numel() for p in model.parameters())
    table = model.embed_tokens_per_layer
    return effective, effective + (table.numel() if table is not None else 0)
