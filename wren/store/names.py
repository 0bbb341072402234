"""Model names (`gemma3:270m`, `mine/tutor`, `host/namespace/model:tag`) and blob digests, validated before
either becomes part of a path: a name or digest that could climb out of the store is refused."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadOptionError

DEFAULT_HOST = "wren.local"
OLLAMA_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63}){0,8}(?::[0-9]{1,5})?")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
NAME_HELP = ("a model name is [host/][namespace/]model[:tag] made of letters, digits, '_', '-' and '.', "
             "e.g. gemma3:270m or mine/tutor")


@dataclass(frozen=True)
class Name:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        """The short form users type: host and namespace are left out where they are the defaults."""
        if self.host == DEFAULT_HOST:
            if self.namespace == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return self.full

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """The four path components of the manifest below `manifests/`."""
        return self.host, self.namespace, self.model, self.tag

    def on_host(self, host: str) -> "Name":
        return Name(host, self.namespace, self.model, self.tag)


def parse_name(text: str, default_host: str = DEFAULT_HOST) -> Name:
    """`model`, `model:tag`, `namespace/model[:tag]` or `host/namespace/model[:tag]`; BadOptionError otherwise."""
    if not isinstance(text, str) or not text or len(text) > 350:
        raise BadOptionError(f"bad model name {text!r}: {NAME_HELP}")
    if "://" in text or ".." in text or "\\" in text or text.startswith("/") or "@" in text:
        raise BadOptionError(f"bad model name {text!r}: {NAME_HELP}")
    parts = text.split("/")
    if len(parts) > 3:
        raise BadOptionError(f"bad model name {text!r}: at most host/namespace/model:tag")
    last = parts[-1]
    model, sep, tag = last.partition(":")
    if not sep:
        tag = DEFAULT_TAG
    host, namespace = default_host, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace = parts[0], parts[1]
    elif len(parts) == 2:
        namespace = parts[0]
    checks = [(_HOST, host, "host"), (_PART, namespace, "namespace"), (_PART, model, "model"), (_TAG, tag, "tag")]
    for pattern, value, what in checks:
        if not pattern.fullmatch(value):
            raise BadOptionError(f"bad model name {text!r}: its {what} {value!r} is not allowed; {NAME_HELP}")
    return Name(host.lower(), namespace, model, tag)


def is_name(text: str) -> bool:
    try:
        parse_name(text)
    except BadOptionError:
        return False
    return True


def check_digest(digest: str) -> str:
    """The hex of a `sha256:<64 lowercase hex>` digest; BadOptionError for anything else."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise BadOptionError(f"bad digest {digest!r}: expected sha256:<64 lowercase hex digits>")
    return digest[7:]


def name_from_words(text: str) -> str:
    """A model-name component made from a file or folder name: other characters become '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:80].rstrip("-._")
    return cleaned or "model"


def check_relpath(text: str) -> str:
    """A file's path inside a model folder (`model.safetensors`, `sub/tokenizer.json`): relative, no `..`, no
    hidden or empty parts; BadOptionError otherwise."""
    parts = text.split("/") if isinstance(text, str) else []
    if (not parts or len(text) > 512 or "\\" in text or "\x00" in text or text.startswith("/")
            or any(not p or p.startswith(".") or not _FILE.fullmatch(p) for p in parts)):
        raise BadOptionError(f"bad file name {text!r} in a model folder: a relative path without '..'")
    return text


_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,() -]{0,254}")
