"""The model store: Ollama's layout (`manifests/<host>/<namespace>/<model>/<tag>` + `blobs/sha256-<hex>`) under
$WREN_MODELS (default ~/.wren/models), so it also reads a store Ollama wrote.

Writes are atomic (temp file in `<store>/tmp`, fsync, rename); a manifest is written only once every blob it
names exists, under a store-wide lock that garbage collection takes too. Folder models are materialised as a
folder of hard links to their blobs in `<store>/wren-folders/<key>` (built in a temp folder, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from ..errors import BadOptionError, ModelFormatError, ModelNotFoundError, WrenError
from . import blobs
from .manifest import (ADAPTER, FOLDER_FILE, GROUP, LICENSE, MAX_MANIFEST, MAX_TEXT_LAYER, MESSAGES, MODEL, PARAMS,
                       SYSTEM, TEMPLATE, Layer, Manifest, details_from_config, parse_manifest)
from .modelfile import normalize_parameters, render
from .names import DEFAULT_HOST, OLLAMA_HOST, Name, check_digest, check_relpath, parse_name

ORPHAN_GRACE = 3600.0
COPIED_MARK = ".wren-copied"  # in a materialised folder whose files are copies, not links


@dataclass
class ResolvedModel:
    name: str
    digest: str                      # sha256:<hex> of the manifest
    model_path: Path                 # what wren.load opens: a .gguf blob or a folder
    template: str | None
    system: str | None
    parameters: dict                 # Options field names -> values (stop: list[str]); num_ctx, kv_cache
    adapters: list[Path]
    messages: list[dict]
    license: str | None
    size: int
    modified_at: datetime
    details: dict = field(default_factory=dict)
    licenses: list[str] = field(default_factory=list)


@dataclass
class ModelEntry:
    name: str
    digest: str                      # sha256:<hex> of the manifest
    size: int                        # bytes of all layers
    modified_at: datetime
    details: dict                    # format, family, families, parameter_size, quantization_level, parent_model


def default_root() -> Path:
    return Path(os.environ.get("WREN_MODELS") or Path.home() / ".wren" / "models").expanduser()


class ModelStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.manifests_dir = self.root / "manifests"
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.folders_dir = self.root / "wren-folders"

    # --- blobs -------------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / f"sha256-{check_digest(digest)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put_blob(self, digest: str, chunks: Iterable[bytes]) -> None:
        """Store the bytes of `chunks` as blob `digest`: verified by sha256 while written, then renamed into
        place. BadOptionError (and nothing stored) when the bytes hash to anything else."""
        target = self.blob_path(digest)
        tmp, got, _ = blobs.stream_to_temp(chunks, self.tmp_dir)
        if f"sha256:{got}" != digest:
            blobs.remove(tmp)
            raise BadOptionError(f"the data does not match digest {digest} (it hashes to sha256:{got}); "
                                 "nothing was stored")
        blobs.publish(tmp, target)

    def put_bytes(self, data: bytes) -> Layer:
        """A small blob (text, JSON) from bytes; returns a descriptor without a media type."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        target = self.blob_path(digest)
        if not (target.is_file() and target.stat().st_size == len(data)):
            blobs.write_bytes(data, target, self.tmp_dir)
        return Layer("", digest, len(data))

    def import_file(self, path: Path, media_type: str, progress=None, label: str = "",
                    annotations: dict | None = None) -> Layer:
        """Copy a file into the store as a blob, hashing it on the way (one read, one write)."""
        total = path.stat().st_size
        tmp, hexd, size = blobs.stream_to_temp(blobs.read_chunks(path), self.tmp_dir, total, label or path.name,
                                               progress)
        blobs.publish(tmp, self.blobs_dir / f"sha256-{hexd}")
        return Layer(media_type, f"sha256:{hexd}", size, dict(annotations or {}))

    def _text(self, layer: Layer) -> str:
        if layer.size > MAX_TEXT_LAYER:
            raise ModelFormatError(f"layer {layer.digest} is too large for a {layer.media_type} layer")
        return self.blob_path(layer.digest).read_bytes().decode("utf-8", errors="replace")

    # --- manifests ---------------------------------------------------------------------------------------

    def _manifest_path(self, name: Name) -> Path:
        path = self.manifests_dir.joinpath(*name.parts)
        if os.path.commonpath([os.path.abspath(path), os.path.abspath(self.manifests_dir)]) != \
                os.path.abspath(self.manifests_dir):
            raise BadOptionError(f"bad model name {name.full!r}")
        return path

    def _find(self, text: str) -> tuple[Name, Path] | None:
        """The manifest a name refers to; a name without a host is looked up under wren's host, then Ollama's."""
        name = parse_name(text)
        candidates = [name]
        if text.count("/") < 2 and name.host == DEFAULT_HOST:
            candidates.append(name.on_host(OLLAMA_HOST))
        for n in candidates:
            path = self._manifest_path(n)
            if path.is_file():
                return n, path
        return None

    def _locate(self, text: str) -> tuple[Name, Path]:
        """Like _find, but registers the default model on first use and raises for an unknown name."""
        found = self._find(text)
        if found is None and parse_name(text) == _default_name():
            from .importers import register_default

            register_default(self)
            found = self._find(text)
        if found is None:
            raise ModelNotFoundError(f"model {text!r} not found in the store at {self.root}: `wren pull` a .gguf "
                                     "file, a model folder or ollama://NAME first, or give a path")
        return found

    def _read(self, path: Path, what: str) -> tuple[bytes, Manifest]:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_MANIFEST + 1)
        except OSError as exc:
            raise ModelNotFoundError(f"cannot read the manifest of {what}: {exc.strerror or exc}") from None
        if len(raw) > MAX_MANIFEST:
            raise ModelFormatError(f"the manifest of {what} is too large to be real (corrupt)")
        return raw, parse_manifest(raw, what)

    def _write_manifest(self, name: Name, manifest: Manifest, raw: bytes | None = None) -> None:
        """Publish a manifest once every blob it names is present (checked under the store lock); the blobs
        only a replaced manifest used are collected."""
        target = self._manifest_path(name)
        with blobs.StoreLock(self.root):
            for d in manifest.descriptors:
                path = self.blob_path(d.digest)
                if not path.is_file() or path.stat().st_size != d.size:
                    raise ModelFormatError(f"blob {d.digest} of {name} is missing or has the wrong size; "
                                           "nothing was written")
            replaced = set()
            if target.is_file():
                try:
                    replaced = {d.digest for d in self._read(target, str(name))[1].descriptors}
                except WrenError:
                    pass
            blobs.write_bytes(raw if raw is not None else manifest.to_bytes(), target, self.tmp_dir)
            if replaced:
                self._collect(replaced)

    def _all_manifests(self):
        """(Name, path) of every manifest file in the store; files that are not a valid name are skipped."""
        if not self.manifests_dir.is_dir():
            return
        for path in sorted(self.manifests_dir.glob("*/*/*/*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            host, namespace, model, tag = path.relative_to(self.manifests_dir).parts
            try:
                name = parse_name(f"{host}/{namespace}/{model}:{tag}")
            except BadOptionError:
                continue
            if name.parts == (host, namespace, model, tag):
                yield name, path

    # --- the API -----------------------------------------------------------------------------------------

    def resolve(self, name: str) -> ResolvedModel:
        try:
            return self._resolve(name)
        except ModelFormatError:
            if parse_name(name) != _default_name():
                raise
            from .importers import register_default

            register_default(self)  # the default model can always be stored again from its package
            return self._resolve(name)

    def _resolve(self, name: str) -> ResolvedModel:
        n, path = self._locate(name)
        raw, m = self._read(path, str(n))
        for d in m.layers:
            blob = self.blob_path(d.digest)
            try:
                size = blob.stat().st_size
            except OSError:
                raise ModelFormatError(f"model {n}: blob {d.digest} is missing from {self.blobs_dir}; pull or "
                                       "create the model again") from None
            if size != d.size:
                raise ModelFormatError(f"model {n}: blob {d.digest} has {size} bytes, the manifest says {d.size} "
                                       "(truncated or corrupt); pull or create the model again")
        parts = self._contents(m, str(n))
        return ResolvedModel(
            name=self._display(n), digest="sha256:" + hashlib.sha256(raw).hexdigest(),
            model_path=self._model_path(m, str(n)), template=parts["template"], system=parts["system"],
            parameters=parts["parameters"], adapters=self._adapter_paths(m), messages=parts["messages"],
            license="\n\n".join(parts["licenses"]) or None, size=sum(d.size for d in m.layers),
            modified_at=datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc), details=self._details(m),
            licenses=parts["licenses"])

    def list(self) -> list[ModelEntry]:
        entries = []
        for n, path in self._all_manifests():
            try:
                raw, m = self._read(path, str(n))
                mtime = path.stat().st_mtime
            except WrenError:
                continue  # one corrupt manifest must not hide the others
            entries.append(ModelEntry(self._display(n), "sha256:" + hashlib.sha256(raw).hexdigest(),
                                      sum(d.size for d in m.layers),
                                      datetime.fromtimestamp(mtime, tz=timezone.utc), self._details(m)))
        return sorted(entries, key=lambda e: e.modified_at, reverse=True)

    def pull(self, source: str, name: str | None = None, progress=None) -> str:
        from .importers import pull

        blobs.clean_stale(self.tmp_dir)
        return pull(self, source, name, progress)

    def create(self, name: str, modelfile: str, base_dir: Path | None = None, progress=None,
               files: dict[str, str] | None = None) -> str:
        from .importers import create

        blobs.clean_stale(self.tmp_dir)
        return create(self, name, modelfile, base_dir, progress, files)

    def copy(self, source: str, destination: str) -> None:
        target = parse_name(destination)
        n, path = self._locate(source)
        raw, m = self._read(path, str(n))
        self._write_manifest(target, m, raw)

    def delete(self, name: str) -> None:
        found = self._find(name)
        if found is None:
            raise ModelNotFoundError(f"model {name!r} not found in the store at {self.root}")
        n, path = found
        with blobs.StoreLock(self.root):
            try:
                _, m = self._read(path, str(n))
                candidates = {d.digest for d in m.descriptors}
            except WrenError:
                candidates = set()  # a corrupt manifest: remove it; its blobs go with the next prune
            path.unlink()
            blobs.fsync_dir(path.parent)
            for parent in list(path.parents)[:3]:
                if parent == self.manifests_dir:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._collect(candidates)
        self.prune()

    def modelfile(self, name: str) -> str:
        n, path = self._locate(name)
        _, m = self._read(path, str(n))
        parts = self._contents(m, str(n))
        return render(str(self._model_path(m, str(n))), name=self._display(n), template=parts["template"],
                      system=parts["system"], parameters=parts["parameters"],
                      adapters=[str(p) for p in self._adapter_paths(m)], messages=parts["messages"],
                      licenses=parts["licenses"])

    # --- garbage collection --------------------------------------------------------------------------------

    def _references(self) -> tuple[set[str], set[str]] | None:
        """Blob digests and folder keys every manifest uses; None if some manifest cannot be read (then
        nothing is collected: its references are unknown)."""
        digests, folders = set(), set()
        for n, path in self._all_manifests():
            try:
                _, m = self._read(path, str(n))
            except WrenError:
                return None
            digests |= {d.digest for d in m.descriptors}
            folders |= {_folder_key(files) for files in _folder_groups(m).values()}
        return digests, folders

    def _collect(self, candidates: set[str]) -> None:
        """With the lock held: remove the candidate blobs and materialised folders nothing uses any more."""
        refs = self._references()
        if refs is None:
            return
        digests, folders = refs
        for digest in candidates - digests:
            blobs.remove(self.blob_path(digest))
        if self.folders_dir.is_dir():
            for entry in self.folders_dir.iterdir():
                if entry.name not in folders:
                    self._discard(entry)

    def prune(self, grace: float = ORPHAN_GRACE) -> list[str]:
        """Remove stale temp files, and blobs no manifest uses that are older than `grace` seconds (younger ones
        may belong to a create in progress, e.g. blobs a client uploaded first). Returns the removed digests."""
        blobs.clean_stale(self.tmp_dir)
        removed: list[str] = []
        if not self.blobs_dir.is_dir():
            return removed
        with blobs.StoreLock(self.root):
            refs = self._references()
            if refs is None:
                return removed
            now = time.time()
            for entry in self.blobs_dir.iterdir():
                if not entry.name.startswith("sha256-"):
                    continue
                digest = "sha256:" + entry.name[7:]
                try:
                    check_digest(digest)
                    st = entry.stat()
                except (BadOptionError, OSError):
                    continue
                # ctime moves when a hard link is made, so a blob just linked in from Ollama counts as new
                if digest not in refs[0] and now - max(st.st_mtime, st.st_ctime) > grace:
                    entry.unlink()
                    removed.append(digest)
        return removed

    def _discard(self, path: Path) -> None:
        """Move a folder aside (a rename is atomic), then remove it."""
        aside = blobs.temp_path(self.tmp_dir)
        try:
            os.rename(path, aside)
        except OSError:
            return
        blobs.remove(aside)

    # --- what a manifest holds --------------------------------------------------------------------------

    def _contents(self, m: Manifest, what: str) -> dict:
        template = [self._text(d) for d in m.of_type(TEMPLATE)]
        system = [self._text(d) for d in m.of_type(SYSTEM)]
        params: dict = {}
        for d in m.of_type(PARAMS):
            try:
                doc = json.loads(self._text(d))
            except ValueError:
                raise ModelFormatError(f"the parameters of {what} are not valid JSON (corrupt)") from None
            if not isinstance(doc, dict):
                raise ModelFormatError(f"the parameters of {what} are not a JSON object")
            params.update(doc)
        try:
            params = normalize_parameters(params)
        except BadOptionError as exc:
            raise ModelFormatError(f"{what}: stored parameter out of range ({exc})") from None
        messages = []
        for d in m.of_type(MESSAGES):
            try:
                doc = json.loads(self._text(d))
            except ValueError:
                doc = None
            if not isinstance(doc, list) or not all(isinstance(x, dict) and isinstance(x.get("role"), str)
                                                    and isinstance(x.get("content"), str) for x in doc):
                raise ModelFormatError(f"the messages of {what} are not a list of {{role, content}} (corrupt)")
            messages += [{"role": x["role"], "content": x["content"]} for x in doc]
        return {"template": template[-1] if template else None, "system": system[-1] if system else None,
                "parameters": params, "messages": messages,
                "licenses": [self._text(d) for d in m.of_type(LICENSE)]}

    def _details(self, m: Manifest) -> dict:
        path = self.blob_path(m.config.digest)
        try:
            if path.stat().st_size > MAX_MANIFEST:
                return {}
            return details_from_config(path.read_bytes())
        except OSError:
            return {}

    def _model_path(self, m: Manifest, what: str) -> Path:
        gguf = m.of_type(MODEL)
        if gguf:
            return self.blob_path(gguf[0].digest)
        files = _folder_groups(m).get("model")
        if files:
            return self.materialize(files)
        raise ModelFormatError(f"model {what} has no model layer")

    def _adapter_paths(self, m: Manifest) -> list[Path]:
        out, groups = [], _folder_groups(m)
        seen = set()
        for d in m.of_type(ADAPTER):
            group = d.annotations.get(GROUP)
            if group is None:
                out.append(self.blob_path(d.digest))
            elif group not in seen:
                seen.add(group)
                out.append(self.materialize(groups[f"adapter:{group}"]))
        return out

    def _display(self, n: Name) -> str:
        """Ollama's default host shows short too, unless wren has a model of the same short name."""
        if n.host == OLLAMA_HOST and not self._manifest_path(n.on_host(DEFAULT_HOST)).is_file():
            return str(n.on_host(DEFAULT_HOST))
        return str(n)

    # --- folders -----------------------------------------------------------------------------------------

    def materialize(self, files: list[tuple[str, str, int]]) -> Path:
        """A folder holding each (relative path, digest, size) as a hard link to its blob (a symlink, or a copy,
        where the file system has no hard links). Built in a temp folder and renamed into place."""
        target = self.folders_dir / _folder_key(files)
        if self._folder_ok(target, files):
            return target
        blobs.clean_stale(self.tmp_dir)
        tmp = blobs.temp_path(self.tmp_dir)
        tmp.mkdir()
        try:
            copied = False
            for rel, digest, _ in files:
                dst = tmp / check_relpath(rel)
                dst.parent.mkdir(parents=True, exist_ok=True)
                src = self.blob_path(digest)
                try:
                    os.link(src, dst)
                except OSError:
                    try:
                        os.symlink(src.resolve(), dst)
                    except OSError:
                        shutil.copyfile(src, dst)
                        copied = True
            if copied:
                (tmp / COPIED_MARK).touch()
            blobs.fsync_dir(tmp)
            with blobs.StoreLock(self.root):
                if self._folder_ok(target, files):
                    blobs.remove(tmp)
                    return target
                if target.exists():
                    self._discard(target)
                blobs.publish(tmp, target)
        except BaseException:
            blobs.remove(tmp)
            raise
        return target

    def _folder_ok(self, target: Path, files) -> bool:
        if not target.is_dir():
            return False
        copied = (target / COPIED_MARK).exists()
        for rel, digest, size in files:
            try:
                st = (target / rel).stat()
                if st.st_size != size or not (copied or os.path.samestat(st, self.blob_path(digest).stat())):
                    return False
            except OSError:
                return False
        return True


def _folder_groups(m: Manifest) -> dict[str, list[tuple[str, str, int]]]:
    """The folders a manifest describes: "model" (FOLDER_FILE layers) and "adapter:<group>" (adapter files)."""
    groups: dict[str, list] = {}
    for d in m.layers:
        if d.media_type == FOLDER_FILE:
            key = "model"
        elif d.media_type == ADAPTER and GROUP in d.annotations:
            key = f"adapter:{d.annotations[GROUP]}"
        else:
            continue
        title = d.title
        if title is None:
            raise ModelFormatError(f"folder layer {d.digest} has no file name")
        try:
            check_relpath(title)
        except BadOptionError as exc:
            raise ModelFormatError(str(exc)) from None
        groups.setdefault(key, []).append((title, d.digest, d.size))
    return groups


def _folder_key(files) -> str:
    doc = json.dumps(sorted([rel, digest] for rel, digest, _ in files), separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:40]


def _default_name() -> Name:
    from ..weights.load import DEFAULT_MODEL

    return parse_name(DEFAULT_MODEL)
