"""Reading model files: GGUF, safetensors folders, and the caches made from them."""

from __future__ import annotations

from pathlib import Path


def file_identity(path: Path) -> str:
    """What a cache made from a file is keyed by: its device, inode, size and modification time. Not its
    path, so that the hard links of one file (a GGUF pulled into the model store, an Ollama blob imported)
    share one cache instead of each writing its own; a rewritten file gets a new key."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
