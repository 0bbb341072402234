"""Atomic file operations for the store: temp files that name their writer, sha256 while streaming, fsync and
rename, hard links that fall back to copies, stale-temp cleanup and a store-wide lock.

Every temp file lives in `<store>/tmp/` and is called `.tmp-<pid>-<random>`; one whose process is gone (or that
is a day old) is debris from an interrupted run and may be removed by whoever finds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

from ..errors import BadOptionError, WrenError

CHUNK = 1 << 20
STALE_SECONDS = 24 * 3600
TMP_PREFIX = ".tmp-"

Progress = Callable[[int, int, str], None]


def temp_path(tmp_dir: Path, suffix: str = "") -> Path:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tmp_dir / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{suffix}"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; rely on age alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def is_stale(path: Path, now: float | None = None) -> bool:
    """A temp file (or folder) whose writer is no longer running, or one older than a day."""
    name = path.name
    if not name.startswith(TMP_PREFIX):
        return False
    try:
        pid = int(name[len(TMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        pid = None
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_SECONDS or pid is None or (pid != os.getpid() and not _pid_alive(pid))


def remove(path: Path) -> None:
    """Remove a file, a link or a whole folder; missing is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def clean_stale(tmp_dir: Path) -> list[Path]:
    """Remove the debris of interrupted runs; returns what was removed."""
    removed = []
    if not tmp_dir.is_dir():
        return removed
    now = time.time()
    for entry in tmp_dir.iterdir():
        if is_stale(entry, now):
            remove(entry)
            removed.append(entry)
    return removed


def fsync_dir(path: Path) -> None:
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp file (or folder) into place and make the rename durable."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def write_bytes(data: bytes, target: Path, tmp_dir: Path) -> None:
    """Atomically replace `target` with `data`: temp file, fsync, rename."""
    tmp = temp_path(tmp_dir)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, target)
    except BaseException:
        remove(tmp)
        raise


def stream_to_temp(chunks: Iterable[bytes], tmp_dir: Path, total: int = 0, label: str = "",
                   progress: Progress | None = None) -> tuple[Path, str, int]:
    """Write chunks to a new temp file while hashing them; returns (temp path, sha256 hex, size). The caller
    renames the temp file into place or removes it; on any failure here it is already removed."""
    tmp = temp_path(tmp_dir)
    sha, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise BadOptionError("blob data must be bytes")
                sha.update(chunk)
                f.write(chunk)
                size += len(chunk)
                if progress:
                    progress(size, max(total, size), label)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove(tmp)
        raise
    return tmp, sha.hexdigest(), size


def read_chunks(path: Path, chunk: int | None = None):
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk or CHUNK)
            if not block:
                return
            yield block


def sha256_file(path: Path, progress: Progress | None = None, label: str = "") -> str:
    sha, done = hashlib.sha256(), 0
    total = path.stat().st_size
    for block in read_chunks(path):
        sha.update(block)
        done += len(block)
        if progress:
            progress(done, total, label)
    return sha.hexdigest()


def link_into(src: Path, tmp_dir: Path) -> Path | None:
    """A new temp hard link to `src`, or None where the file system cannot (another device, no links)."""
    tmp = temp_path(tmp_dir)
    try:
        os.link(src, tmp)
    except OSError:
        return None
    return tmp


class StoreLock:
    """An exclusive advisory lock on `<store>/.lock` (fcntl where there is one): held while manifests are
    written and blobs collected, so a delete never removes a blob that a concurrent create just referenced."""

    def __init__(self, root: Path):
        self.path = root / ".lock"
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WrenError(f"cannot write to the model store at {self.path.parent}: {exc.strerror or exc}") from None
        with contextlib.suppress(ImportError):
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
