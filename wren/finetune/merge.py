"""`wren merge`: fold adapters into the weights. A TurboQuant base is dequantized first (the merged weight
is base + update, which the old codes cannot hold); `wren merge --bits` then re-quantizes the whole model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import BadOptionError, UnsupportedModelError
from ..quant.experts import TQExperts
from ..quant.folder import write_folder
from ..quant.linear import TQEmbedding, TQLinear
from ..quant.tables import TQRowTable
from ..weights.tables import RowTable
from . import lora


def densify(model) -> None:
    """Replace every TurboQuant module of the model by its dense (dequantized) float32 equivalent."""
    for name, m in list(model.named_modules()):
        if isinstance(m, TQExperts):
            raise UnsupportedModelError("merging into a TurboQuant MoE model is not supported yet")
        if isinstance(m, (TQLinear, TQEmbedding)):
            parent, child = lora._split(model, name)
            w = m.dense()
            if isinstance(m, TQEmbedding):
                dense = nn.Embedding(w.shape[0], w.shape[1])
            else:
                dense = nn.Linear(w.shape[1], w.shape[0], bias=False)
            dense.weight = nn.Parameter(w, requires_grad=False)
            setattr(parent, child, dense)
    table = model.embed_tokens_per_layer
    if isinstance(table, TQRowTable):
        rows = table.lookup(torch.arange(table.rows), "cpu", torch.float32)
        model.embed_tokens_per_layer = RowTable.from_tensor(rows.to(torch.float16))
    model.quant_recipe = None


def merge_all(model) -> int:
    """Fold every adapter still beside its layer into the weights, leaving a dense model."""
    n = lora.merge(model)
    densify(model)
    return n


def save_dense(model, out: Path) -> Path:
    """A dense model folder (`model.safetensors`, `config.json`, tokenizer, template) that wren.load opens,
    written atomically (quant/folder.py's write_folder)."""
    if model.quant_recipe is not None:
        raise BadOptionError("the model still has TurboQuant layers; densify it first")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    table = model.embed_tokens_per_layer
    if table is not None:
        tensors["embed_tokens_per_layer.weight"] = table.lookup(
            torch.arange(table.rows), "cpu", torch.float32).to(torch.float16).contiguous()
    return write_folder(model, out, tensors)
