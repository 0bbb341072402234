"""Constrained decoding for `format`: JSON, or JSON that follows a JSON schema.

A schema compiles to a tree of small `Node`s; a character-level pushdown automaton walks it. A state is a
set of stacks (anyOf and enums of different lengths can leave several alive), each stack a tuple of frames,
so a state is immutable and trying a token costs nothing to undo. Per step, a cheap vectorised prefilter
masks every token whose first character cannot come next; then candidates are drawn (or, greedy, taken in
logit order) and each is checked character by character until one is accepted -- never the whole 262k
vocabulary. Token strings are computed once per tokenizer.

Supported: type (incl. lists), properties / required / additionalProperties, items / minItems / maxItems,
enum / const, minLength / maxLength, integer minimum / maximum, anyOf / oneOf, local $ref. Object keys come
from `properties` (any order, no repeats); others are refused unless additionalProperties allows them.
Unsupported keywords (pattern, format, ...) are ignored: the output is still JSON of the right shape.

When num_predict is about to run out, the shortest completion of the value (required keys with minimal
values, closing quotes and brackets) is written instead, so a cut-off answer still parses and validates.
"""

from __future__ import annotations

import json
import weakref

import torch

from ..errors import BadOptionError
from ..sampling import Options, apply_penalties, candidates

MAX_WS = 12  # whitespace characters in a row, a newline only first: enough to pretty-print, too few to loop
MAX_DEPTH = 32
WS = " \t\n"
DIGITS = "0123456789"


class Node:
    __slots__ = ("kind", "props", "required", "extra", "items", "lo", "hi", "texts", "options")

    def __init__(self, kind, props=(), required=frozenset(), extra=None, items=None, lo=None, hi=None,
                 texts=(), options=()):
        self.kind, self.props, self.required, self.extra = kind, dict(props), frozenset(required), extra
        self.items, self.lo, self.hi, self.texts, self.options = items, lo, hi, tuple(texts), tuple(options)


ANY = Node("any")


def compile_schema(schema, root=None, depth: int = 0) -> Node:
    """A JSON schema (dict or bool) -> Node. Raises BadOptionError for a schema that is not one."""
    root = schema if root is None else root
    if depth > MAX_DEPTH:
        return ANY
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise BadOptionError(f"a JSON schema must be an object, got {schema!r:.80}")
    if "$ref" in schema:
        return compile_schema(_resolve_ref(schema["$ref"], root), root, depth + 1)
    if "const" in schema:
        return Node("enum", texts=[json.dumps(schema["const"])])
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise BadOptionError("a schema's enum must be a non-empty list")
        return Node("enum", texts=[json.dumps(v) for v in schema["enum"]])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise BadOptionError(f"a schema's {key} must be a non-empty list")
            return Node("anyof", options=[compile_schema(s, root, depth + 1) for s in schema[key]])
    if "allOf" in schema and isinstance(schema["allOf"], list) and len(schema["allOf"]) == 1:
        return compile_schema(schema["allOf"][0], root, depth + 1)
    kind = schema.get("type")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    if isinstance(kind, list):
        return Node("anyof", options=[compile_schema({**schema, "type": k}, root, depth + 1) for k in kind])
    if kind is None:
        return ANY
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise BadOptionError("a schema's properties must be an object")
        extra = schema.get("additionalProperties", not props)
        extra = None if extra is False else compile_schema(True if extra is True else extra, root, depth + 1)
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise BadOptionError("a schema's required must be a list of strings")
        compiled = {json.dumps(k): compile_schema(v, root, depth + 1) for k, v in props.items()}
        return Node("object", props=compiled, required={json.dumps(r) for r in required if r in props},
                    extra=extra)
    if kind == "array":
        items = compile_schema(schema.get("items", True), root, depth + 1)
        return Node("array", items=items, lo=_int(schema, "minItems", 0), hi=_int(schema, "maxItems", None))
    if kind == "string":
        return Node("string", lo=_int(schema, "minLength", 0), hi=_int(schema, "maxLength", None))
    if kind in ("integer", "number"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if kind == "integer":
            import math
            lo = None if lo is None else math.ceil(lo)
            hi = None if hi is None else math.floor(hi)
        return Node(kind, lo=lo, hi=hi)
    if kind == "boolean":
        return Node("enum", texts=["true", "false"])
    if kind == "null":
        return Node("enum", texts=["null"])
    raise BadOptionError(f"unknown JSON schema type {kind!r}")


def _int(schema, key, default):
    value = schema.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise BadOptionError(f"a schema's {key} must be a non-negative integer")
    return value


def _resolve_ref(ref, root):
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise BadOptionError(f"only local $ref ('#/...') is supported, not {ref!r:.80}")
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise BadOptionError(f"$ref {ref!r} points nowhere in the schema")
        node = node[part]
    return node


# ---- the automaton ------------------------------------------------------------------------------
# Frames (tuples, the first item names the kind):
#   ("V", node, ws)                       a value of `node` is expected
#   ("L", texts, pos)                     matching one of several literal texts (enum, true, null, ...)
#   ("S", lo, hi, n, esc)                 inside a string: n chars so far, esc = escape progress
#   ("N", node, phase, text)              inside a number
#   ("O", node, phase, done, key, ws)     inside an object; phase in start/key/colon/after/comma
#   ("A", node, phase, count, ws)         inside an array; phase in start/after/next

_NUMBER_END = {"zero", "int", "frac", "exp"}


def _ws_ok(ws: int, ch: str) -> bool:
    """One more whitespace character after `ws` of them: a newline may only open a run."""
    return ws < MAX_WS and (ch != "\n" or ws == 0)


def _value_start(node: Node, ch: str) -> list[tuple]:
    """Frames that replace a ("V", ...) frame on the value's first character."""
    kind = node.kind
    if kind == "anyof":
        return [f for option in node.options for f in _value_start(option, ch)]
    if kind == "any":
        if ch == "{":
            return [("O", ANY_OBJECT, "start", frozenset(), "", 0)]
        if ch == "[":
            return [("A", ANY_ARRAY, "start", 0, 0)]
        if ch == '"':
            return [("S", 0, None, 0, 0)]
        if ch == "-" or ch in DIGITS:
            return _number(Node("number"), "", ch)
        return _literal(("true", "false", "null"), ch)
    if kind == "object":
        return [("O", node, "start", frozenset(), "", 0)] if ch == "{" else []
    if kind == "array":
        return [("A", node, "start", 0, 0)] if ch == "[" else []
    if kind == "string":
        return [("S", node.lo or 0, node.hi, 0, 0)] if ch == '"' else []
    if kind in ("integer", "number"):
        return _number(node, "", ch) if ch == "-" or ch in DIGITS else []
    if kind == "enum":
        return _literal(node.texts, ch)
    return []


ANY_OBJECT = Node("object", extra=ANY)
ANY_ARRAY = Node("array", items=ANY, lo=0)


def _literal(texts, ch: str, pos: int = 0) -> list[tuple]:
    left = tuple(t for t in texts if len(t) > pos and t[pos] == ch)
    if not left:
        return []
    out = []
    if any(len(t) == pos + 1 for t in left):
        out.append(None)  # a text ends here: the value is complete
    rest = tuple(t for t in left if len(t) > pos + 1)
    if rest:
        out.append(("L", rest, pos + 1))
    return out


def _number(node: Node, text: str, ch: str) -> list[tuple]:
    """Extend a number's text by ch, or [] when that breaks JSON's number grammar or the bounds."""
    phase = _number_phase(text + ch)
    if phase is None:
        return []
    new = text + ch
    if node.kind == "integer" and phase not in ("sign", "zero", "int"):
        return []
    if not _number_feasible(node, new, phase):
        return []
    return [("N", node, phase, new)]


def _number_phase(text: str):
    """The phase after reading `text`, or None if no JSON number starts with it."""
    phase = "begin"
    for c in text:
        if phase == "begin":
            phase = "sign" if c == "-" else "zero" if c == "0" else "int" if c in DIGITS else None
        elif phase == "sign":
            phase = "zero" if c == "0" else "int" if c in DIGITS else None
        elif phase == "zero":
            phase = "dot" if c == "." else "e" if c in "eE" else None
        elif phase == "int":
            phase = "int" if c in DIGITS else "dot" if c == "." else "e" if c in "eE" else None
        elif phase in ("dot", "frac"):
            phase = "frac" if c in DIGITS else ("e" if phase == "frac" and c in "eE" else None)
        elif phase == "e":
            phase = "esign" if c in "+-" else "exp" if c in DIGITS else None
        elif phase in ("esign", "exp"):
            phase = "exp" if c in DIGITS else None
        if phase is None:
            return None
    return phase


def _number_feasible(node: Node, text: str, phase: str) -> bool:
    """Can some number within [lo, hi] still be written starting with `text`? Exact on the integer part."""
    lo, hi = node.lo, node.hi
    if lo is None and hi is None:
        return True
    negative = text.startswith("-")
    if negative and lo is not None and lo >= 0:
        return False
    if not negative and hi is not None and hi < 0 and text:
        return False
    if phase not in ("zero", "int"):
        return True  # fractions and exponents: only the sign is checked
    digits = text.lstrip("-")
    if phase == "zero":
        candidates = [(0, 0)]
    else:
        # every integer with these leading digits, up to 18 more digits
        candidates = [(int(digits) * 10 ** d, int(digits) * 10 ** d + 10 ** d - 1) for d in range(19)]
    for a, b in candidates:
        if negative:
            a, b = -b, -a
        if (hi is None or a <= hi) and (lo is None or b >= lo):
            return True
    return False


def _number_complete(node: Node, text: str) -> bool:
    if _number_phase(text) not in _NUMBER_END:
        return False
    if node.lo is None and node.hi is None:
        return True
    value = float(text)
    return (node.lo is None or value >= node.lo) and (node.hi is None or value <= node.hi)


def _pop_into_parent(stack: tuple, ch: str | None) -> list[tuple]:
    """The stack after its top frame completed; `ch` (a character that ended a number) is fed on."""
    stack = stack[:-1]
    if ch is None:
        return [stack]
    if not stack:
        return []
    return _step(stack, ch)


def _step(stack: tuple, ch: str) -> list[tuple]:
    """Successor stacks after reading one character (none: rejected). An empty stack is a finished value."""
    if not stack:
        return []
    top = stack[-1]
    tag = top[0]
    below = stack[:-1]
    if tag == "V":
        _, node, ws = top
        if ch in WS:
            return [below + (("V", node, ws + 1),)] if _ws_ok(ws, ch) else []
        return [below if f is None else below + (f,) for f in _value_start(node, ch)]
    if tag == "L":
        _, texts, pos = top
        return [below if f is None else below + (f,) for f in _literal(texts, ch, pos)]
    if tag == "S":
        _, lo, hi, n, esc = top
        if esc == 0:
            if ch == '"':
                return [below] if n >= lo else []
            if ch == "\\":
                return [below + (("S", lo, hi, n, 1),)] if hi is None or n < hi else []
            if ord(ch) < 0x20:
                return []
            return [below + (("S", lo, hi, n + 1, 0),)] if hi is None or n < hi else []
        if esc == 1:
            if ch in '"\\/bfnrt':
                return [below + (("S", lo, hi, n + 1, 0),)]
            return [below + (("S", lo, hi, n, 2),)] if ch == "u" else []
        if ch in "0123456789abcdefABCDEF":
            return [below + (("S", lo, hi, n + 1, 0),)] if esc == 5 else [below + (("S", lo, hi, n, esc + 1),)]
        return []
    if tag == "N":
        _, node, phase, text = top
        grown = _number(node, text, ch)
        if grown:
            return [below + (grown[0],)]
        if _number_complete(node, text):
            return _pop_into_parent(stack, ch)
        return []
    if tag == "O":
        return _object_step(stack, top, ch)
    if tag == "A":
        return _array_step(stack, top, ch)
    return []


def _object_step(stack, top, ch) -> list[tuple]:
    _, node, phase, done, key, ws = top
    below = stack[:-1]

    def frame(phase, done=done, key="", ws=0):
        return ("O", node, phase, done, key, ws)

    if phase in ("start", "after", "comma", "colon") and ch in WS:
        return [below + (frame(phase, key=key, ws=ws + 1),)] if _ws_ok(ws, ch) else []
    if phase in ("start", "comma"):
        if ch == '"' and _keys_left(node, done):
            return [below + (frame("key", key='"'),)]
        if ch == "}" and phase == "start" and node.required <= done:
            return [below]
        return []
    if phase == "key":
        text = key + ch
        if node.extra is not None:
            if ch == "\\" or ord(ch) < 0x20:
                return []
            if ch == '"':
                return [below + (frame("colon", key=text),)] if text not in done else []
            return [below + (frame("key", key=text),)]
        names = [k for k in node.props if k not in done and k.startswith(text)]
        if not names:
            return []
        return [below + (frame("colon" if text in names else "key", key=text),)]
    if phase == "colon":
        if ch != ":":
            return []
        child = node.props.get(key, node.extra)
        return [below + (frame("after", done=done | {key}), ("V", child, 0))]
    if phase == "after":
        if ch == "," and _keys_left(node, done):
            return [below + (frame("comma"),)]
        if ch == "}" and node.required <= done:
            return [below]
        return []
    return []


def _keys_left(node: Node, done: frozenset) -> bool:
    return node.extra is not None or any(k not in done for k in node.props)


def _array_step(stack, top, ch) -> list[tuple]:
    _, node, phase, count, ws = top
    below = stack[:-1]
    if ch in WS:
        return [below + (("A", node, phase, count, ws + 1),)] if _ws_ok(ws, ch) else []
    if phase in ("start", "next"):
        if ch == "]" and phase == "start" and count >= (node.lo or 0):
            return [below]
        if node.hi is not None and count >= node.hi:
            return []
        return _step(below + (("A", node, "after", count + 1, 0), ("V", node.items, 0)), ch)
    if phase == "after":
        if ch == "," and (node.hi is None or count < node.hi):
            return [below + (("A", node, "next", count, 0),)]
        if ch == "]" and count >= (node.lo or 0):
            return [below]
    return []


# ---- closing a value early (a num_predict budget running out) -------------------------------------


def _minimal(node: Node) -> str:
    """The shortest text of a value of `node` (required keys and minItems included)."""
    kind = node.kind
    if kind == "anyof":
        return min((_minimal(o) for o in node.options), key=len)
    if kind == "object":
        return "{" + ",".join(f"{k}:{_minimal(v)}" for k, v in node.props.items() if k in node.required) + "}"
    if kind == "array":
        return "[" + ",".join([_minimal(node.items)] * (node.lo or 0)) + "]"
    if kind == "string":
        return '"' + "a" * (node.lo or 0) + '"'
    if kind in ("integer", "number"):
        value = 0
        if node.lo is not None and node.lo > 0:
            value = node.lo
        elif node.hi is not None and node.hi < 0:
            value = node.hi
        return json.dumps(int(value) if kind == "integer" else value)
    if kind == "enum":
        return min(node.texts, key=len)
    return "null"


def _rest_of_object(node: Node, done: frozenset, lead: bool) -> str:
    """The required keys not yet written (each `,key:value`, without the first comma unless `lead`), then }."""
    pairs = [f"{k}:{_minimal(v)}" for k, v in node.props.items() if k in node.required and k not in done]
    return ("," if lead and pairs else "") + ",".join(pairs) + "}"


def _close_frame(frame: tuple) -> str | None:
    tag = frame[0]
    if tag == "V":
        return _minimal(frame[1])
    if tag == "L":
        return min(frame[1], key=len)[frame[2]:]
    if tag == "S":
        _, lo, _hi, n, esc = frame
        out = "n" if esc == 1 else "0" * (6 - esc) if esc else ""
        n += 1 if esc else 0
        return out + "a" * max(0, lo - n) + '"'
    if tag == "N":
        _, node, _phase, text = frame
        for tail in ("", "0", "9", "00", "99", "000", "999", ".0", "0.0"):
            if _number_phase(text + tail) is not None and _number_complete(node, text + tail):
                return tail
        return None
    if tag == "O":
        _, node, phase, done, key, _ws = frame
        if phase == "start":
            return _rest_of_object(node, done, lead=False)
        if phase == "after":
            return _rest_of_object(node, done, lead=True)
        if phase == "comma":
            left = [k for k in node.props if k in node.required and k not in done]
            if not left:
                left = [k for k in node.props if k not in done][:1] or ['"_"']
            first = left[0]
            child = node.props.get(first, node.extra or ANY)
            return f"{first}:{_minimal(child)}" + _rest_of_object(node, done | {first}, lead=True)
        if phase in ("key", "colon"):
            if phase == "key":
                if node.extra is None:
                    name = next((k for k in node.props if k not in done and k.startswith(key)), None)
                    if name is None:
                        return None
                    rest, key = name[len(key):], name
                else:
                    rest, key = '"', key + '"'
            else:
                rest = ""
            child = node.props.get(key, node.extra or ANY)
            return rest + ":" + _minimal(child) + _rest_of_object(node, done | {key}, lead=True)
    if tag == "A":
        _, node, phase, count, _ws = frame
        item = _minimal(node.items)
        if phase == "start":
            return ",".join([item] * (node.lo or 0)) + "]"
        if phase == "after":
            return "".join("," + item for _ in range(max(0, (node.lo or 0) - count))) + "]"
        if phase == "next":
            return item + "".join("," + item for _ in range(max(0, (node.lo or 0) - count - 1))) + "]"
    return None


def _closing(stack: tuple) -> str | None:
    parts = []
    for frame in reversed(stack):
        part = _close_frame(frame)
        if part is None:
            return None
        parts.append(part)
    return "".join(parts)


class Matcher:
    """The automaton's state over a whole output; `advance` moves it, `accepts` only looks."""

    def __init__(self, root: Node):
        self.stacks = frozenset([(("V", root, 0),)])

    @staticmethod
    def _feed(stacks, text: str):
        for ch in text:
            nxt = set()
            for s in stacks:
                nxt.update(_step(s, ch))
            if not nxt:
                return None
            stacks = nxt
        return stacks

    def accepts(self, text: str) -> bool:
        return bool(text) and self._feed(self.stacks, text) is not None

    def advance(self, text: str) -> None:
        stacks = self._feed(self.stacks, text)
        if stacks is None:
            raise ValueError(f"{text!r} does not continue the JSON")
        self.stacks = frozenset(stacks)

    @property
    def complete(self) -> bool:
        """The value is finished and nothing may follow."""
        return () in self.stacks

    @property
    def finishable(self) -> bool:
        """The value could end here (e.g. a top-level number), so an end-of-turn token is allowed."""
        return any(not s or (len(s) == 1 and s[0][0] == "N" and _number_complete(s[0][1], s[0][3]))
                   for s in self.stacks)

    def first_chars(self, probe: str) -> list[bool]:
        """For each character of `probe`, whether it may come next."""
        return [self._feed(self.stacks, c) is not None for c in probe]

    def closing(self) -> str | None:
        """The shortest text found that completes the value from here (checked by the automaton)."""
        best = None
        for stack in self.stacks:
            text = _closing(stack)
            if text is None or (best is not None and len(text) >= len(best)):
                continue
            done = self._feed(self.stacks, text) if text else self.stacks
            if done is not None and () in done:
                best = text
        return best


# ---- token strings and the sampler --------------------------------------------------------------

_PROBE = "".join(chr(c) for c in range(128)) + "é"  # ASCII, then one stand-in for every non-ASCII char
_NON_ASCII, _NEVER = 128, 129
_tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class TokenTable:
    """Each token's text as it adds to a stream (never half a character) and its first-character bucket."""

    def __init__(self, tokenizer, vocab_size: int):
        n = min(tokenizer.vocab_size, vocab_size)
        anchor = tokenizer.encode("a")[-1:] or [0]
        base = tokenizer.decode(anchor)
        texts, buckets = [], []
        for i in range(vocab_size):
            text = ""
            if i < n and not tokenizer.is_special(i):
                full = tokenizer.decode(anchor + [i])
                text = full[len(base):] if full.startswith(base) else ""
                if "\ufffd" in text:
                    text = ""  # a piece of a multi-byte character: never offered under a constraint
            texts.append(text)
            buckets.append(_NEVER if not text else ord(text[0]) if ord(text[0]) < 128 else _NON_ASCII)
        self.texts = texts
        self.bucket = torch.tensor(buckets, dtype=torch.long)
        self.masks: dict = {}
        ref = weakref.ref(tokenizer)
        self.encode = lambda text: ref().encode(text)

    @classmethod
    def get(cls, tokenizer, vocab_size: int) -> "TokenTable":
        table = _tables.get(tokenizer)
        if table is None or len(table.texts) != vocab_size:
            table = _tables[tokenizer] = cls(tokenizer, vocab_size)
        return table


class Constraint:
    """Picks each next token so the output stays a prefix of JSON matching the schema.

    `sample(logits, history)` returns a token id, or None when the value is complete (the caller ends the
    turn). The chain is the plain sampler's (penalties -> top_k -> top_p -> min_p -> temperature) applied
    over the tokens the prefilter allows; a drawn token the automaton refuses is removed and drawn again.
    """

    TRIES = 16

    def __init__(self, root: Node, table: TokenTable, opts: Options, stop_ids: set[int]):
        self.matcher = Matcher(root)
        self.table, self.opts = table, opts
        self.stop_ids = sorted(i for i in stop_ids if i < len(table.texts))
        self.generator = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
        self.generated = 0
        self.forced: list[int] | None = None  # the tokens that close the value, once the budget runs low

    @property
    def forcing(self) -> bool:
        """Closing the value: the caller lets these last tokens run past num_predict."""
        return bool(self.forced)

    def _budget_check(self) -> None:
        """With num_predict about to run out, switch to writing the shortest completion of the value, so
        a cut-off answer still parses (it may overrun num_predict by the few tokens that need)."""
        limit = self.opts.num_predict
        if limit < 0 or self.forced is not None or self.table.encode is None:
            return
        left = limit - self.generated
        if left > 64:  # closing texts are short; skip the work until they could matter
            return
        text = self.matcher.closing()
        if text is None:
            return
        ids = self.table.encode(text) if text else []
        if len(ids) >= left:
            self.forced = list(ids)

    def _next_forced(self) -> int | None:
        if not self.forced:
            return None
        token = self.forced.pop(0)
        text = self.table.texts[token] if token < len(self.table.texts) else ""
        if text and self.matcher.accepts(text):
            self.matcher.advance(text)
        self.generated += 1
        if not self.forced:
            self.forced = []
            self.matcher.stacks = frozenset([()])  # closed
        return token

    def _prefilter(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = tuple(self.matcher.first_chars(_PROBE))
        finish = self.matcher.finishable
        mask = self.table.masks.get((allowed, finish))
        if mask is None:  # states repeat (inside a string, between values): masks are cached per table
            mask = torch.tensor(allowed + (False,))[self.table.bucket]
            if finish and self.stop_ids:
                mask[self.stop_ids] = True
            if len(self.table.masks) > 64:
                self.table.masks.clear()
            self.table.masks[(allowed, finish)] = mask
        n = mask.numel()
        return torch.where(mask, logits[:n], float("-inf"))

    def _ok(self, token: int) -> bool:
        if token in self.stop_ids:
            return self.matcher.finishable
        return token < len(self.table.texts) and self.matcher.accepts(self.table.texts[token])

    def sample(self, logits: torch.Tensor, history: list[int]) -> int | None:
        if self.matcher.complete:
            return None
        self._budget_check()
        if self.forced is not None:
            return self._next_forced()
        logits = self._prefilter(apply_penalties(logits, history, self.opts).float())
        token = None
        if self.opts.temperature > 0:
            kept, ids = candidates(logits, self.opts)
            probs = torch.softmax(kept / self.opts.temperature, dim=-1)
            for _ in range(self.TRIES):
                if not probs.sum() > 0:
                    break
                pick = int(torch.multinomial(probs, 1, generator=self.generator))
                drawn = pick if ids is None else int(ids[pick])
                if self._ok(drawn):
                    token = drawn
                    break
                probs[pick] = 0
        if token is None:  # greedy, or the draws kept missing: the best allowed token in logit order
            top = torch.topk(logits, min(64, logits.numel()))
            token = next((t for v, t in zip(top.values.tolist(), top.indices.tolist())
                          if v > float("-inf") and self._ok(t)), None)
            if token is None:
                order = torch.argsort(logits, descending=True)
                finite = int(torch.isfinite(logits).sum())
                token = next((t for t in order[:finite].tolist() if self._ok(t)), None)
            if token is None:
                return None  # nothing in the vocabulary continues the value: end here
        if token not in self.stop_ids:
            self.matcher.advance(self.table.texts[token])
            self.generated += 1
        return token


def root_for_format(fmt) -> Node | None:
    """Ollama's `format`: "" / None (free text), "json" (any JSON object) or a JSON schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return ANY_OBJECT
    if isinstance(fmt, dict):
        return compile_schema(fmt)
    raise BadOptionError(f'format must be "json" or a JSON schema object, got {fmt!r:.80}')
