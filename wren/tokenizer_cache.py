"""A compact tokenizer's arrays (wren/compact_bpe.py), kept on disk after its first build.

Building them for a 262k vocabulary is most of a model's load time: parsing a 33 MB tokenizer.json and
indexing its ~500k merges (~1.6 s), or deriving the merges from a GGUF's scores (~1.1 s). Kept under
$WREN_CACHE/tokenizers/ (default ~/.cache/wren/tokenizers/; $WREN_TOKENIZER_CACHE moves them), a later load
reads 16 MB of arrays instead (~80 ms). The key is the source file's identity (weights.file_identity: its
inode, size and mtime, so hard links share an entry and a rewritten file gets a new one); the newest KEEP
are kept. Any failure (a read-only home, a full disk, a corrupt cache file, a build without the compiled
`_bpe`) builds the tokenizer as without the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from . import compact_bpe
from .compact_bpe import ARRAYS, Added, CompactBPE
from .tokenizer import Tokenizer
from .weights import file_identity

FORMAT = 1  # bump when CompactBPE.build changes what it computes
KEEP = 8


def cache_root() -> Path:
    if os.environ.get("WREN_TOKENIZER_CACHE"):
        return Path(os.environ["WREN_TOKENIZER_CACHE"])
    return Path(os.environ.get("WREN_CACHE", Path.home() / ".cache" / "wren")) / "tokenizers"


def cache_key(source: Path) -> str:
    return hashlib.sha256(f"{FORMAT}:{file_identity(source)}".encode()).hexdigest()[:32]


def load(source: Path, build: Callable[[], Tokenizer]) -> Tokenizer:
    """The tokenizer `build()` makes from the file `source`, read from the cache where an earlier build left it."""
    if not compact_bpe.available():
        return build()
    try:
        path = cache_root() / f"{cache_key(source)}.npz"
    except OSError:
        return build()
    try:
        tokenizer = _read(path)
        os.utime(path)  # most recently used: pruned last
        return tokenizer
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):  # corrupt or foreign: built anew
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    tokenizer = build()
    if tokenizer.compact_model is not None:
        try:
            _write(path, tokenizer)
            _prune(path.parent)
        except OSError:
            pass
    return tokenizer


def _write(path: Path, tokenizer: Tokenizer) -> None:
    model = tokenizer.compact_model
    meta = {"added": [list(t) for t in model.added], "prefix_space": model.prefix_space, "unk_id": model.unk_id,
            "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
            "special": sorted(tokenizer.special_ids)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **model.arrays)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _read(path: Path) -> Tokenizer:
    with np.load(path, allow_pickle=False) as z:  # zipfile checks each member's CRC as it reads it
        arrays = {k: z[k] for k in ARRAYS}
        meta = json.loads(z["meta"].tobytes())
    added = [Added(int(i), bool(special), bool(normalized)) for i, special, normalized in meta["added"]]
    model = CompactBPE(arrays, added, bool(meta["prefix_space"]), meta["unk_id"])
    ids = [meta["bos"], meta["eos"], meta["pad"]]
    if not all(i is None or 0 <= i < model.vocab_size for i in ids + meta["special"]):
        raise ValueError(f"{path}: special ids out of range")
    return Tokenizer(model, *ids, meta["special"])


def _prune(root: Path) -> None:
    caches = sorted(root.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in caches[KEEP:]:
        old.unlink(missing_ok=True)
