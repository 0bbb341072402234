"""Modelfiles, as Ollama writes them: FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, MESSAGE, LICENSE; values bare,
"quoted" or \"\"\"triple-quoted over several lines\"\"\"; `#` comments. Parsing names the line of any error;
`render` writes the text `wren show --modelfile` prints, which parses back to the same model."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..errors import BadOptionError

COMMANDS = ("FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "MESSAGE", "LICENSE")
ROLES = ("system", "user", "assistant")
_KV_CACHE = re.compile(r"[A-Za-z0-9_./-]{1,32}")


def option_fields() -> tuple[str, ...]:
    """Every sampler option (imported late: the CLI reads this module without loading torch)."""
    from ..sampling import Options

    return tuple(f.name for f in dataclasses.fields(Options))


def parameter_names() -> tuple[str, ...]:
    return option_fields()  # num_ctx and kv_cache are Options fields too


@dataclass
class Modelfile:
    source: str = ""                     # FROM
    source_line: int = 0
    adapters: list[tuple[str, int]] = field(default_factory=list)   # (path, line)
    template: str | None = None
    system: str | None = None
    parameters: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)


def _error(line: int, message: str) -> BadOptionError:
    return BadOptionError(f"Modelfile line {line}: {message}")


def parse_modelfile(text: str) -> Modelfile:
    if not isinstance(text, str):
        raise BadOptionError("a Modelfile must be text")
    lines = [line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n")]
    mf = Modelfile()
    i = 0
    while i < len(lines):
        lineno, stripped = i + 1, lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        match = re.match(r"(\S+)\s*(.*)", stripped, re.S)
        command, rest = match.group(1).upper(), match.group(2)
        if command not in COMMANDS:
            raise _error(lineno, f"unknown command {match.group(1)!r} (a Modelfile has {', '.join(COMMANDS)})")
        key = None
        if command in ("PARAMETER", "MESSAGE"):
            match = re.match(r"(\S+)\s*(.*)", rest, re.S)
            if not match or not match.group(2):
                what = "a name and a value" if command == "PARAMETER" else "a role and the content"
                raise _error(lineno, f"{command} needs {what}")
            key, rest = match.group(1), match.group(2)
        value, i = _value(rest, lines, i, lineno)
        _apply(mf, command, key, value, lineno)
    if not mf.source:
        raise BadOptionError("the Modelfile has no FROM line: name a model, a .gguf file or a model folder")
    return mf


def _value(rest: str, lines: list[str], i: int, lineno: int) -> tuple[str, int]:
    """The value that starts at `rest` on line i; returns it and the index of the next line."""
    if rest.startswith('"""'):
        body = rest[3:]
        parts, j, first = [], i, True
        while j < len(lines):
            # the closing quotes end a line, so a value may itself end in a quote: """say "hi""""
            chunk = body if first else lines[j]
            if chunk.rstrip().endswith('"""'):
                parts.append(chunk.rstrip()[:-3])
                return "\n".join(parts), j + 1
            if '"""' in chunk:
                raise _error(j + 1, 'text after the closing """')
            parts.append(chunk)
            j, first = j + 1, False
        raise _error(lineno, 'the """ opened here is never closed')
    if rest.startswith('"'):
        out, k = [], 1
        while k < len(rest):
            ch = rest[k]
            if ch == "\\" and k + 1 < len(rest) and rest[k + 1] in '"\\':
                out.append(rest[k + 1])
                k += 2
                continue
            if ch == '"':
                if rest[k + 1:].strip():
                    raise _error(lineno, "text after the closing quote")
                return "".join(out), i + 1
            out.append(ch)
            k += 1
        raise _error(lineno, "the quote opened here is never closed (use \"\"\" for several lines)")
    value = rest.strip()
    if not value:
        raise _error(lineno, "the command needs a value")
    return value, i + 1


def _apply(mf: Modelfile, command: str, key: str | None, value: str, line: int) -> None:
    if command == "FROM":
        if mf.source:
            raise _error(line, f"a second FROM (the first is on line {mf.source_line})")
        if not value.strip():
            raise _error(line, "FROM needs a model name or a path")
        mf.source, mf.source_line = value.strip(), line
    elif command == "ADAPTER":
        mf.adapters.append((value.strip(), line))
    elif command == "TEMPLATE":
        mf.template = value
    elif command == "SYSTEM":
        mf.system = value
    elif command == "LICENSE":
        mf.licenses.append(value)
    elif command == "MESSAGE":
        role = key.lower()
        if role not in ROLES:
            raise _error(line, f"MESSAGE role {key!r} is not one of {', '.join(ROLES)}")
        mf.messages.append({"role": role, "content": value})
    else:
        try:
            name, coerced = parameter(key, value)
        except BadOptionError as exc:
            raise _error(line, str(exc)) from None
        if name == "stop":
            mf.parameters.setdefault("stop", []).append(coerced)
        else:
            mf.parameters[name] = coerced


def parameter(key: str, value):
    """(name, value) of one PARAMETER, coerced and range-checked the way the sampler will use it."""
    from ..sampling import Options

    name = key.lower()
    if name not in parameter_names():
        raise BadOptionError(f"unknown parameter {key!r} (wren knows {', '.join(parameter_names())})")
    if name == "kv_cache":
        from ..kv.types import kv_cache_types

        if not isinstance(value, str) or not _KV_CACHE.fullmatch(value):
            raise BadOptionError(f"parameter kv_cache must be a cache type such as f16 or tq4, got {value!r}")
        try:
            kv_cache_types(value)
        except BadOptionError as exc:
            raise BadOptionError(f"parameter kv_cache: {exc}") from None
        return name, value
    if name == "stop":
        if not isinstance(value, str) or not value:
            raise BadOptionError("parameter stop must be a non-empty string")
        return name, value
    return name, getattr(Options.from_dict({name: value}), name)


def normalize_parameters(params: dict) -> dict:
    """A stored params layer (ours or Ollama's) as sampler options: known names coerced; names wren has no
    use for (Ollama's num_gpu, mirostat, ...) are dropped. BadOptionError for a value out of range."""
    out: dict = {}
    known = parameter_names()
    for key, value in params.items():
        if not isinstance(key, str) or key.lower() not in known or value is None:
            continue
        if key.lower() == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list):
                raise BadOptionError("parameter stop must be a list of strings")
            out["stop"] = [parameter("stop", s)[1] for s in stops]
        else:
            name, coerced = parameter(key, value)
            out[name] = coerced
    return out


# --- rendering --------------------------------------------------------------------------------------------


def _long(text: str) -> str:
    if '"""' not in text:
        return f'"""{text}"""'
    if "\n" not in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise BadOptionError('a text holding both """ and a line break cannot be written as a Modelfile value')


def _short(value) -> str:
    text = str(value)
    if isinstance(value, str) and (not text or text != text.strip() or '"' in text or "\n" in text
                                   or text.startswith("#")):
        return _long(text) if "\n" in text else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, str) and " " in text:
        return f'"{text}"'
    return text


def render(source: str, *, name: str = "", template: str | None = None, system: str | None = None,
           parameters: dict | None = None, adapters=(), messages=(), licenses=()) -> str:
    out = []
    if name:
        out += ['# Modelfile generated by "wren show"', "# To build a new Modelfile based on this, replace FROM with:",
                f"# FROM {name}", ""]
    out.append(f"FROM {source}")
    out += [f"ADAPTER {a}" for a in adapters]
    if template is not None:
        out.append(f"TEMPLATE {_long(template)}")
    if system is not None:
        out.append(f"SYSTEM {_long(system)}")
    for key, value in (parameters or {}).items():
        for v in (value if isinstance(value, list) else [value]):
            out.append(f"PARAMETER {key} {_short(v)}")
    out += [f"MESSAGE {m['role']} {_long(m['content'])}" for m in messages]
    out += [f"LICENSE {_long(text)}" for text in licenses]
    return "\n".join(out) + "\n"
