"""How `wren.load(NAME)` reaches the store: a source that is no existing path but a valid model name is
resolved here, and what the store keeps beside the weights (parameters, system prompt, template, messages,
licence) is attached to the loaded model."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError
from .names import is_name


def lookup(source):
    """The ResolvedModel a load() source names, or None when the source is a path (or not a name at all).
    None (no source) means the default model, registered in the store on first use."""
    from ..errors import WrenError
    from ..weights.load import DEFAULT_MODEL
    from .store import ModelStore

    if source is None or (isinstance(source, str) and source in ("", "default")):
        try:
            return ModelStore().resolve(DEFAULT_MODEL)
        except ModelNotFoundError:
            raise  # the default-model package is missing: say so
        except (OSError, WrenError):  # e.g. a read-only home: the loader uses the package's own copy
            return None
    if isinstance(source, os.PathLike) or not isinstance(source, str):
        return None
    if Path(source).expanduser().exists() or not is_name(source):
        return None
    store = ModelStore()
    try:
        return store.resolve(source)
    except ModelNotFoundError:
        raise ModelNotFoundError(f"no model {source!r}: it is neither a file or folder here nor a model in the "
                                 f"store at {store.root} (`wren list` shows those; `wren pull` adds one)") from None


def attach(model, resolved) -> None:
    """Give a loaded model what its store entry adds: `store_name`, `defaults` (sampler options), `kv_cache`,
    `system`, `messages`, `adapters`, and the template and licence where the entry has its own."""
    from .modelfile import option_fields

    model.store_name = resolved.name
    model.defaults = {k: v for k, v in resolved.parameters.items() if k in option_fields() and k != "kv_cache"}
    model.kv_cache = resolved.parameters.get("kv_cache")
    model.system = resolved.system
    model.messages = list(resolved.messages)
    model.adapters = list(resolved.adapters)
    if resolved.template is not None:
        if is_go_template(resolved.template):
            model.notes.append("the stored TEMPLATE is an Ollama (Go) template; wren renders the model's own "
                               "chat template instead")
        else:
            model.chat_template = resolved.template
    if resolved.license:
        model.license = resolved.license
    if resolved.adapters:
        apply_adapters(model, resolved.adapters)


def apply_adapters(model, paths) -> None:
    """Apply the entry's PEFT-format LoRA adapters (what `wren finetune` registers): folded into dense
    layers, kept beside TurboQuant ones. Adapters in other formats (a GGUF LoRA) are noted, not applied."""
    from ..finetune.peft_io import CONFIG, apply_adapter

    other = 0
    for path in paths:
        if Path(path).is_dir() and (Path(path) / CONFIG).is_file():
            apply_adapter(model, path, merge_dense=True)
        else:
            other += 1
    if other:
        model.notes.append(f"{other} stored adapter(s) are not in PEFT's format and are not applied")


def is_go_template(text: str) -> bool:
    """Ollama templates are Go templates (`{{ .Prompt }}`, `{{ if .System }}`); wren's are Jinja."""
    import re

    return re.search(r"\{\{-?\s*(?:\.|(?:if|range|with|template|block)\s+[.$(]|end\s*-?\}\})", text) is not None
