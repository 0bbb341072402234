"""The model store: content-addressed blobs and Ollama-layout manifests under $WREN_MODELS (~/.wren/models),
Modelfiles, and importers (.gguf files, model folders, an Ollama store on this machine).

    store = ModelStore()
    store.pull("./gemma-4-e2b-it/")                 # -> "gemma-4-e2b-it:latest"
    store.create("mine/tutor", "FROM gemma3:270m\\nSYSTEM You teach.")
    resolved = store.resolve("mine/tutor")         # .model_path is what wren.load opens
"""

from __future__ import annotations

from .modelfile import Modelfile, parse_modelfile
from .names import DEFAULT_HOST, OLLAMA_HOST, Name, check_digest, parse_name
from .store import ModelEntry, ModelStore, ResolvedModel, default_root

__all__ = ["ModelStore", "ResolvedModel", "ModelEntry", "Modelfile", "parse_modelfile", "Name", "parse_name",
           "check_digest", "default_root", "DEFAULT_HOST", "OLLAMA_HOST"]
