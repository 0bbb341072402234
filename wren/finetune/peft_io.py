"""Adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names a LoRA tensor by the path of its module in the wrapped HF model, without the adapter name:
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` for Gemma3ForCausalLM and
Gemma4ForCausalLM alike (a multimodal checkpoint has `model.language_model.` in place of `model.`).
wren's module names are the HF ones without the leading `model.`, so the mapping is a prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from . import lora

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model."


def peft_key(wren_name: str, part: str) -> str:
    """`layers.0.mlp.up_proj`, `lora_A` -> PEFT's key."""
    return f"{PREFIX}{wren_name}.{part}.weight"


def wren_key(key: str) -> tuple[str, str]:
    """PEFT's key -> (wren module name, "lora_A" | "lora_B")."""
    name = key.removeprefix("base_model.model.")
    name = name.replace("model.language_model.", "", 1).removeprefix("model.")
    # Keys saved with the adapter name still in them (`q_proj.lora_A.default.weight`) are read too.
    name = name.removesuffix(".weight").removesuffix(".default")
    module, _, part = name.rpartition(".")
    if part not in ("lora_A", "lora_B"):
        raise ModelFormatError(f"unexpected tensor {key!r} in the adapter: only LoRA A/B matrices are supported")
    return module, part


def adapter_config(rank: int, alpha: float, dropout: float, targets, rslora: bool = False,
                   base: str | None = None) -> dict:
    """The adapter_config.json PEFT writes for a plain LoRA (fields PEFT needs to rebuild it)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": sorted(set(targets)), "bias": "none",
            "use_rslora": rslora, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base,
            "revision": None}


def save_adapter(model, folder: str | os.PathLike, config: dict) -> Path:
    """Write the model's LoRA tensors and `config` to `folder` (replaced atomically if it exists)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora.lora_modules(model).items():
        tensors[peft_key(name, "lora_A")] = m.lora_A.detach().float().cpu().contiguous()
        tensors[peft_key(name, "lora_B")] = m.lora_B.detach().float().cpu().contiguous()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        for f in tmp.iterdir():
            f.chmod(0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)  # mkdtemp made it private; an adapter is as readable as a model folder
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter config, wren module name -> {"lora_A": A, "lora_B": B}) of a PEFT LoRA folder."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ModelNotFoundError(f"{folder} is not a PEFT adapter folder (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{folder / CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{folder / CONFIG} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise UnsupportedModelError(f"{folder}: only plain LoRA adapters are supported, not "
                                    f"{'DoRA' if config.get('use_dora') else config.get('peft_type')}")
    if config.get("modules_to_save"):
        raise UnsupportedModelError(f"{folder}: adapters with modules_to_save are not supported")
    try:
        raw = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"{folder / WEIGHTS} is not a readable safetensors file ({exc})") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        name, part = wren_key(key)
        modules.setdefault(name, {})[part] = t
    for name, parts in modules.items():
        if set(parts) != {"lora_A", "lora_B"} or parts["lora_A"].shape[0] != parts["lora_B"].shape[1]:
            raise ModelFormatError(f"{folder}: module {name} lacks a matching lora_A/lora_B pair")
    return config, modules


def _alpha_for(name: str, config: dict) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def apply_adapter(model, folder: str | os.PathLike, merge_dense: bool = False) -> int:
    """Load a PEFT LoRA adapter into the model (wrapping the layers it names). With `merge_dense`, the
    update is folded into dense bases at once. Returns the number of adapted layers."""
    config, modules = read_adapter(folder)
    present = dict(model.named_modules())
    rslora = bool(config.get("use_rslora"))
    for name, parts in modules.items():
        base = present.get(name)
        if base is None or not (isinstance(base, lora.LoRALinear) or lora._is_base(base)):
            raise ModelFormatError(f"adapter {folder} adapts {name!r}, which is not a linear layer of this "
                                   f"model: was it trained for another base model?")
        a, b = parts["lora_A"], parts["lora_B"]
        out_f, in_f = lora.base_shape(base)
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise ModelFormatError(f"adapter {folder}: {name} is [{b.shape[0]}x{a.shape[1]}] but the model's "
                                   f"layer is [{out_f}x{in_f}]: it was trained for another base model")
        if isinstance(base, lora.LoRALinear):  # a second adapter on the same layer: fold the first one in
            raise UnsupportedModelError(f"{name} already has an adapter; merge it first (`wren merge`)")
        layer = lora.LoRALinear(base, a.shape[0], _alpha_for(name, config), 0.0, rslora)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        layer.requires_grad_(False)
        parent, child = lora._split(model, name)
        setattr(parent, child, layer)
    if merge_dense:
        lora.merge_dense(model)
    return len(modules)
