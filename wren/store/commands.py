"""The store's CLI commands: pull, create, list, show (store views), cp, rm, ps. `wren.cli` only declares their
arguments and dispatches here; errors are WrenErrors, which the CLI prints as one line."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BadOptionError, WrenError

DEFAULT_HOST = "127.0.0.1:11435"


def add_parsers(sub) -> None:
    """The store's subcommands on the `wren` parser (`show` stays the CLI's; see add_show_flags)."""
    pull = sub.add_parser("pull", help="add a .gguf file, a model folder or ollama://NAME to the model store")
    pull.add_argument("source", help="a .gguf file, an HF or wren quantized folder, or ollama://NAME[:TAG]")
    pull.add_argument("name", nargs="?", default=None, help="store it under this name (default: from the source)")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    create = sub.add_parser("create", help="create a model from a Modelfile")
    create.add_argument("name")
    create.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    create.add_argument("--quiet", action="store_true", help="no progress bar")
    listing = sub.add_parser("list", aliases=["ls"], help="list the models in the store")
    listing.set_defaults(command="list")
    cp = sub.add_parser("cp", help="copy a model to a new name")
    cp.add_argument("source")
    cp.add_argument("destination")
    rm = sub.add_parser("rm", help="remove models (and the blobs no other model uses)")
    rm.add_argument("names", nargs="+")
    sub.add_parser("ps", help="the models a running `wren serve` has loaded")


def add_show_flags(show) -> None:
    show.add_argument("--modelfile", action="store_true", help="print the stored model's Modelfile")
    show.add_argument("--parameters", action="store_true", help="print its stored parameters")
    show.add_argument("--template", action="store_true", help="print its template")
    show.add_argument("--system", action="store_true", help="print its system prompt")
    show.add_argument("--kv-cache", default=None, metavar="TYPE",
                      help="the KV cache type to size (default: the model's PARAMETER kv_cache, $WREN_KV_CACHE, dense)")


def wants_store_view(args) -> bool:
    return any(getattr(args, flag, False) for flag in ("modelfile", "parameters", "template", "system"))


class Bar:
    """A small progress bar on stderr: redrawn in place on a terminal, a line per item otherwise."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet, self.stream = quiet, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.last, self.drawn = None, 0.0, False

    def __call__(self, done: int, total: int, label: str = "") -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if label != self.label:
            self.finish()
            self.label = label
            if not self.tty:
                self.stream.write(f"{label} ({_size(total)})\n")
                self.stream.flush()
        if not self.tty or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        frac = done / total if total else 1.0
        width = 25
        filled = int(frac * width)
        self.stream.write(f"\r{label[:32]:<32} {'█' * filled}{'░' * (width - filled)} {frac * 100:3.0f}% "
                          f"{_size(done)}/{_size(total)}   ")
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _ago(when: datetime) -> str:
    seconds = max(0, (datetime.now(timezone.utc) - when).total_seconds())
    for unit, scale in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= scale:
            n = int(seconds // scale)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def _store():
    from . import ModelStore

    return ModelStore()


def cmd_pull(args) -> int:
    bar = Bar(args.quiet)
    try:
        name = _store().pull(args.source, args.name, progress=bar)
    finally:
        bar.finish()
    print(f"pulled {name}")
    return 0


def cmd_create(args) -> int:
    path = Path(args.file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WrenError(f"no Modelfile at {path} (give one with -f)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WrenError(f"cannot read {path} as UTF-8 text: {exc}") from None
    bar = Bar(args.quiet)
    try:
        name = _store().create(args.name, text, base_dir=path.resolve().parent, progress=bar)
    finally:
        bar.finish()
    print(f"created {name}")
    return 0


def cmd_list(args) -> int:
    entries = _store().list()
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    rows += [[e.name, e.digest.removeprefix("sha256:")[:12], _size(e.size), _ago(e.modified_at)] for e in entries]
    _table(rows)
    return 0


def cmd_show_store(args) -> int:
    """`wren show NAME --modelfile/--parameters/--template/--system` (with --license too where asked)."""
    if not args.model:
        raise BadOptionError("give a model name: wren show NAME --modelfile")
    store = _store()
    if args.modelfile:
        sys.stdout.write(store.modelfile(args.model))
        return 0
    resolved = store.resolve(args.model)
    if args.parameters:
        for key, value in resolved.parameters.items():
            for v in value if isinstance(value, list) else [value]:
                print(f"{key:<20}{json.dumps(v) if isinstance(v, str) else v}")
    if args.template and resolved.template is not None:
        print(resolved.template)
    if args.system and resolved.system is not None:
        print(resolved.system)
    if getattr(args, "license", False) and resolved.license:
        print(resolved.license)
    return 0


def cmd_cp(args) -> int:
    _store().copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_rm(args) -> int:
    store = _store()
    for name in args.names:
        store.delete(name)
        print(f"deleted '{name}'")
    return 0


def server_url() -> str:
    host = os.environ.get("WREN_HOST") or DEFAULT_HOST
    if "://" not in host:
        host = "http://" + host
    scheme, _, rest = host.partition("://")
    if ":" not in rest.split("/", 1)[0]:
        rest = rest.split("/", 1)[0] + ":11435"
    return f"{scheme}://{rest.rstrip('/')}"


def cmd_ps(args) -> int:
    import urllib.error
    import urllib.request

    url = server_url()
    try:
        with urllib.request.urlopen(f"{url}/api/ps", timeout=3) as response:
            doc = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WrenError(f"no wren server answers at {url} ({reason}); start one with `wren serve` "
                        "(or set WREN_HOST)") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        raise WrenError(f"the server at {url} sent an unexpected answer to /api/ps")
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "KV CACHE", "UNTIL"]]
    for m in models:
        if not isinstance(m, dict):
            continue
        vram = m.get("size_vram") or 0
        size = m.get("size") or 0
        processor = "100% GPU" if size and vram >= size else ("100% CPU" if not vram else
                                                               f"{100 * vram // max(size, 1)}% GPU")
        kv = f"{m.get('kv_cache', '?')} {_size(m.get('kv_cache_bytes') or 0)}" if "kv_cache" in m else "-"
        rows.append([str(m.get("name", "")), str(m.get("digest", "")).removeprefix("sha256:")[:12], _size(size),
                     processor, str(m.get("context_length", "-")), kv, _until(m.get("expires_at"))])
    _table(rows)
    return 0


def _until(expires) -> str:
    if not isinstance(expires, str) or not expires:
        return "Forever"
    try:
        when = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    except ValueError:
        return expires
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if seconds > 10 * 365 * 86400:
        return "Forever"
    if seconds <= 0:
        return "Stopping..."
    minutes = int(seconds // 60)
    return f"{minutes} minutes from now" if minutes else f"{int(seconds)} seconds from now"


HANDLERS = {"pull": cmd_pull, "create": cmd_create, "list": cmd_list, "cp": cmd_cp, "rm": cmd_rm, "ps": cmd_ps}


def stored_model(word: str) -> bool:
    """Whether `wren run WORD ...` names a model in the store (the default model's name always does)."""
    from ..weights.load import DEFAULT_MODEL
    from .names import is_name

    if word == DEFAULT_MODEL:
        return True
    if not is_name(word):
        return False
    try:
        return _store()._find(word) is not None
    except WrenError:
        return False
