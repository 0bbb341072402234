"""A TurboQuant model folder: `model.safetensors` (codes, scales and the small dense tensors, with the
quantization recipe as JSON metadata), `config.json`, `tokenizer.json` and the chat template; a folder
that `wren.load` and `wren run` open like any other. Written to a temp folder and renamed into place, so an
interrupted quantize never leaves a half model that later loads."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import BadOptionError, ModelFormatError
from ..weights.tables import RowTable
from .experts import TQExperts
from .importance import column_scales, input_loudness
from .linear import TQEmbedding, TQLinear
from .tables import TQRowTable

FORMAT = "wren-turboquant/1"
PLE = "embed_tokens_per_layer"
MIN_GROUP = 8


def _linear_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_model(model, bits: float, group: int, embed_bits: float | None, seed: int = 0, progress=None,
                   input_scales: bool = True, module_bits: dict[str, float] | None = None) -> dict:
    """Swap every linear layer (and the embedding / tied LM head) for TurboQuant modules, in place.
    With `input_scales`, columns are first scaled by the data-free estimate of their inputs' loudness
    (importance.py). `module_bits` overrides the rate of the layers whose name matches a pattern
    (fnmatch, e.g. {"*.v_proj": 5}; the last matching pattern wins). Returns the recipe: which module got
    how many bits."""
    names = _linear_names(model)
    scales = _column_scales(model, names) if input_scales else {}
    recipe = {}
    total = len(names) + (embed_bits is not None)
    for i, name in enumerate(names):
        parent, child = _split(model, name)
        dense = getattr(parent, child)
        g = _group_for(dense.in_features, group)
        if g >= MIN_GROUP:
            s = scales.get(name)
            b = _bits_for(name, bits, module_bits)
            setattr(parent, child, TQLinear.from_dense(dense.weight.data, b, g, seed, column_scale=s))
            recipe[name] = {"bits": b, "group": g, "kind": "linear", **({"input_scale": True} if s is not None else {})}
        if progress:
            progress(i + 1, total, name)
    for name in _expert_names(model):
        parent, child = _split(model, name)
        dense = getattr(parent, child)
        g, g_down = _group_for(dense.gate_up_proj.shape[2], group), _group_for(dense.down_proj.shape[2], group)
        b = _bits_for(name, bits, module_bits)
        if min(g, g_down) >= MIN_GROUP:
            setattr(parent, child, TQExperts.from_dense(dense, b, g, g_down, seed))
            recipe[name] = {"bits": b, "group": g, "down_group": g_down, "kind": "experts"}
    g = _group_for(model.config.hidden_size, group)
    if embed_bits is not None and g >= MIN_GROUP:
        model.embed_tokens = TQEmbedding.from_dense(model.embed_tokens.weight.data, embed_bits, g, seed)
        recipe["embed_tokens"] = {"bits": embed_bits, "group": g, "kind": "embedding"}
        if progress:
            progress(total, total, "embed_tokens")
    table = model.embed_tokens_per_layer
    if table is not None and embed_bits is not None:
        # The PLE table: row-wise codes, one group per decoder layer's slice of a row (a lookup decodes
        # only its rows, from the mapped file).
        g = _group_for(table.width, model.config.hidden_size_per_layer_input)
        model.embed_tokens_per_layer = TQRowTable.from_dense(table, embed_bits, g, seed)
        recipe[PLE] = {"bits": embed_bits, "group": g, "kind": "row_table"}
    elif table is not None:
        dense = table.tensor if table.tensor is not None else table.lookup(torch.arange(table.rows), "cpu",
                                                                           torch.float32)
        model.embed_tokens_per_layer = RowTable.from_tensor(dense.to(torch.float16))
    model.quant_recipe = {"format": FORMAT, "seed": seed, "modules": recipe}
    return model.quant_recipe


def _expert_names(model) -> list[str]:
    """MoE expert stacks: modules holding [E, 2I, H] gate_up and [E, H, I] down parameters."""
    return [name for name, m in model.named_modules()
            if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter) and getattr(m, "down_proj", None) is not None]


# V feeds straight into the attention output; at 4 bits, v_proj at 6 costs +0.06 bits/weight on the 270M
# and takes its perplexity loss from x1.193 to x1.160 over four rotation seeds (docs/turboquant.md), as
# llama.cpp's _M types favour attn_v.
DEFAULT_MODULE_BITS = ("*.v_proj=+2",)


def parse_module_bits(bits: float, items=DEFAULT_MODULE_BITS) -> dict[str, float]:
    """{pattern: bits} from PATTERN=BITS items, BITS absolute ('*.v_proj=5') or relative to `bits` ('+2',
    capped at 8): what `quantize_model` takes as module_bits."""
    module_bits = {}
    for item in items:
        pattern, _, value = item.rpartition("=")
        try:
            module_bits[pattern] = min(8.0, bits + float(value)) if value.startswith("+") else float(value)
        except ValueError:
            pattern = ""
        if not pattern:
            raise BadOptionError(f"--module-bits takes PATTERN=BITS, e.g. '*.v_proj=5'; got {item!r}")
    return module_bits


def _bits_for(name: str, bits: float, module_bits: dict[str, float] | None) -> float:
    for pattern, b in (module_bits or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            bits = b
    return bits


def _column_scales(model, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: s} for the linear layers whose input loudness importance.py can estimate; layers fed the
    same input (q/k/v, gate/up: the same σ object) get one shared s."""
    sigma = input_loudness(model)
    by_input: dict[int, list[str]] = {}
    for name in names:
        if name in sigma:
            by_input.setdefault(id(sigma[name]), []).append(name)
    out = {}
    for members in by_input.values():
        weights = [model.get_submodule(n).weight for n in members]
        s = column_scales(weights, sigma[members[0]])
        out.update({n: s for n in members})
    return out


def _group_for(width: int, group: int) -> int:
    """Group 0 means the whole row. (Without input scales, whole rows won on the 270M at 4 bits, x1.32 vs
    x1.39 for groups of 128; with them, groups of 128 win, x1.16 vs x1.21: docs/turboquant.md.) A width that
    `group` does not divide takes their largest common divisor; one under MIN_GROUP leaves the layer dense."""
    return width if group == 0 else math.gcd(width, group)


def _split(model, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def install(model, recipe: dict) -> None:
    """Before loading a quantized folder: put empty TurboQuant modules where the recipe says (on the
    meta device, like the rest of the model) so the codes and scales load by name."""
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise ModelFormatError(f"unknown quantization format {recipe.get('format') if isinstance(recipe, dict) else recipe!r}")
    seed = recipe.get("seed", 0)
    for name, spec in recipe.get("modules", {}).items():
        if name == PLE:
            continue  # a row table, not a module: the loader builds it from its codes (`ple_table`)
        try:
            parent, child = _split(model, name)
            old = getattr(parent, child)
        except AttributeError:
            raise ModelFormatError(f"quantization recipe names {name!r}, which the model does not have") from None
        try:
            if spec.get("kind") == "experts":
                e, two_i, h = old.gate_up_proj.shape
                module = TQExperts(e, h, two_i // 2, spec["bits"], spec["group"], spec["down_group"], seed)
            else:
                shape = old.weight.shape
                cls = TQEmbedding if spec.get("kind") == "embedding" else TQLinear
                module = cls(shape[0], shape[1], spec["bits"], spec["group"], seed, bool(spec.get("input_scale")))
            setattr(parent, child, module)
        except (KeyError, BadOptionError) as exc:
            raise ModelFormatError(f"bad quantization recipe for {name}: {exc}") from None


def linear_bits_per_weight(model) -> float:
    """Average stored bits per weight of the decoder's linear layers (embeddings excluded)."""
    bits = n = 0
    for name, m in model.named_modules():
        if isinstance(m, TQExperts):
            b, w = m.bits_and_weights()
            bits, n = bits + b, n + w
        elif isinstance(m, TQLinear):
            bits += m.bits_per_weight() * m.out_features * m.in_features
            n += m.out_features * m.in_features
        elif isinstance(m, nn.Linear):
            per = model.storage_bits.get(f"{name}.weight", m.weight.element_size() * 8)
            bits += per * m.weight.numel()
            n += m.weight.numel()
    return bits / n if n else 0.0


def save(model, out: Path) -> Path:
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    table = model.embed_tokens_per_layer
    if isinstance(table, TQRowTable):
        tensors.update(table.tensors(PLE))
    elif table is not None:
        tensors[f"{PLE}.weight"] = table.tensor.contiguous()
    return write_folder(model, out, tensors, {"wren_quant": json.dumps(model.quant_recipe)})


def write_folder(model, out: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """A model folder wren.load opens: `model.safetensors` (tensors), `config.json`, the tokenizer, chat
    template and licence; written to a temp folder beside `out`, fsynced, then renamed into place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BadOptionError(f"{out} exists and is not empty; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata=metadata)
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / "tokenizer.json")
        if model.chat_template:
            (tmp / "chat_template.jinja").write_text(model.chat_template)
        if getattr(model, "license", None):
            (tmp / "LICENSE").write_text(model.license)
        for f in tmp.iterdir():
            f.chmod(0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def file_bytes(path: Path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def ple_table(recipe: dict | None, tensors: dict):
    """The quantized PLE table a recipe describes, from its mapped codes and scales; None if not quantized."""
    spec = (recipe or {}).get("modules", {}).get(PLE)
    if spec is None:
        return None
    try:
        return TQRowTable(tensors[f"{PLE}.codes"], tensors[f"{PLE}.scales"], spec["bits"], spec["group"],
                          recipe.get("seed", 0))
    except (KeyError, BadOptionError) as exc:
        raise ModelFormatError(f"bad quantized PLE table: {exc}") from None
