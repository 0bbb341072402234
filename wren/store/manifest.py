"""Ollama's manifest layout (Docker image manifest v2: a config blob and typed layers) and the model details
(format, family, parameter size, quantization) kept in the config blob, so `list` never opens a weight file.

A GGUF model is one `application/vnd.ollama.image.model` layer, as in Ollama. A folder model (HF checkpoint or
wren TurboQuant folder) is one `application/vnd.wren.model.file` layer per file, each annotated with its path in
the folder (the OCI `org.opencontainers.image.title` annotation); the store links the blobs back into a folder
when the model is resolved.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelFormatError
from .names import check_digest

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
OLLAMA = "application/vnd.ollama.image."
MODEL = OLLAMA + "model"
TEMPLATE = OLLAMA + "template"
SYSTEM = OLLAMA + "system"
PARAMS = OLLAMA + "params"
ADAPTER = OLLAMA + "adapter"
MESSAGES = OLLAMA + "messages"
LICENSE = OLLAMA + "license"
FOLDER_FILE = "application/vnd.wren.model.file"
TITLE = "org.opencontainers.image.title"
GROUP = "io.wren.folder"  # on adapter layers that are files of one adapter folder: which folder
MAX_MANIFEST = 4 << 20
MAX_TEXT_LAYER = 64 << 20


@dataclass
class Layer:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    @property
    def title(self) -> str | None:
        return self.annotations.get(TITLE)


@dataclass
class Manifest:
    config: Layer
    layers: list[Layer]

    def to_bytes(self) -> bytes:
        doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": self.config.as_dict(),
               "layers": [layer.as_dict() for layer in self.layers]}
        return json.dumps(doc, separators=(",", ":")).encode()

    @property
    def descriptors(self) -> list[Layer]:
        return [self.config, *self.layers]

    def of_type(self, media_type: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type == media_type]


def _layer(d, what: str) -> Layer:
    if not isinstance(d, dict):
        raise ModelFormatError(f"{what} is not an object")
    media, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(media, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ModelFormatError(f"{what} lacks a media type or a size")
    try:
        check_digest(digest)
    except Exception:
        raise ModelFormatError(f"{what} has a bad digest {digest!r}") from None
    annotations = d.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise ModelFormatError(f"{what} has bad annotations")
    return Layer(media, digest, size, dict(annotations))


def parse_manifest(raw: bytes, what: str) -> Manifest:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelFormatError(f"the manifest of {what} is not valid JSON (corrupt)") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise ModelFormatError(f"the manifest of {what} is not a schema-2 image manifest")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ModelFormatError(f"the manifest of {what} has no layer list")
    config = _layer(doc.get("config"), f"the config of {what}")
    return Manifest(config, [_layer(d, f"layer {i} of {what}") for i, d in enumerate(layers)])


# --- model details ------------------------------------------------------------------------------------


def human_count(n: int) -> str:
    """Ollama's parameter_size style: 268.10M, 4.3B."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.2f}K"
    return str(n)


def _file_type_name(value) -> str:
    try:
        import gguf

        name = gguf.LlamaFileType(int(value)).name
    except (ImportError, ValueError, TypeError):
        return str(value)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def gguf_details(path: Path) -> dict:
    """Format, family, parameter size and quantization of a GGUF file; ModelFormatError if it is not one."""
    from ..weights.gguf import GGUFFile

    gf = GGUFFile(path)
    arch = gf.metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else "unknown"
    count = sum(math.prod(t.shape) for t in gf.tensors.values())
    ftype = gf.metadata.get("general.file_type")
    if ftype is None:
        from ..weights.load import GGUF_TYPE_NAMES

        common = Counter(GGUF_TYPE_NAMES.get(t.ggml_type, str(t.ggml_type)) for t in gf.tensors.values())
        quant = common.most_common(1)[0][0] if common else "unknown"
    else:
        quant = _file_type_name(ftype)
    return details("gguf", arch, human_count(count), quant)


def folder_details(folder: Path) -> dict:
    """The same for an HF or wren TurboQuant folder (headers only; no tensor is read)."""
    from ..weights.safetensors import json_object, open_checkpoint

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{folder} has no config.json: give a Hugging Face model folder, a wren "
                               "quantized folder or a .gguf file")
    cfg = json_object(cfg_path.read_bytes(), str(cfg_path))
    family = cfg.get("model_type")
    text = cfg.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("model_type"), str):
        family = text["model_type"].removesuffix("_text")
    family = family.removesuffix("_text") if isinstance(family, str) else "unknown"
    files = open_checkpoint(folder)
    count, dtypes, recipe = 0, Counter(), None
    for st in {id(st): st for st in files.values()}.values():
        for name in st.keys():
            dtype, shape, _ = st.entries[name]
            count += math.prod(shape)
            dtypes[str(dtype).removeprefix("torch.").upper()] += math.prod(shape)
        recipe = recipe or st.metadata.get("wren_quant")
    if recipe:
        try:
            modules = json.loads(recipe).get("modules", {})
            bits = Counter(m.get("bits") for m in modules.values() if m.get("kind") == "linear")
            quant = f"TQ{bits.most_common(1)[0][0]:g}" if bits else "TQ"
        except (ValueError, AttributeError, TypeError):
            quant = "TQ"
        count = _dense_count(folder, count)
    else:
        names = {"FLOAT32": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16"}
        top = dtypes.most_common(1)[0][0] if dtypes else "unknown"
        quant = names.get(top, top)
    return details("safetensors", family, human_count(count), quant)


def _dense_count(folder: Path, fallback: int) -> int:
    """A quantized folder stores packed codes, so its tensor sizes do not count parameters: build the config's
    model on the meta device and count there."""
    try:
        from ..config import config_from_dict
        from ..models import ARCHITECTURES
        from ..weights.safetensors import json_object

        import torch

        cfg = config_from_dict(json_object((folder / "config.json").read_bytes(), "config.json"))
        with torch.device("meta"):
            model = ARCHITECTURES[cfg.model_type](cfg)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # a count for display only; the load reports a broken config properly
        return fallback


def details(fmt: str, family: str, parameter_size: str, quant: str) -> dict:
    return {"format": fmt, "family": family, "families": [family], "parameter_size": parameter_size,
            "quantization_level": quant, "parent_model": ""}


def config_blob(d: dict) -> bytes:
    """The config blob in Ollama's form (its `model_*`/`file_type` keys), so either tool can read the other's."""
    doc = {"model_format": d.get("format", ""), "model_family": d.get("family", ""),
           "model_families": d.get("families") or [d.get("family", "")], "model_type": d.get("parameter_size", ""),
           "file_type": d.get("quantization_level", ""), "architecture": "amd64", "os": "linux",
           "rootfs": {"type": "layers", "diff_ids": []}}
    return json.dumps(doc, separators=(",", ":")).encode()


def details_from_config(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    families = doc.get("model_families")
    family = doc.get("model_family") or ""
    return details(str(doc.get("model_format") or ""), str(family),
                   str(doc.get("model_type") or ""), str(doc.get("file_type") or "")) | {
        "families": [str(f) for f in families] if isinstance(families, list) else [str(family)]}
