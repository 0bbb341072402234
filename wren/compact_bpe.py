"""SentencePiece-style BPE (Gemma's tokenizers) held in a few MB of arrays instead of ~95 MB of hash maps.

The HF `tokenizers` model of a 262k-token vocabulary keeps every piece twice as a heap string in a hash map,
the ~500k merges in a third map and the added tokens in tries: ~95 MB resident for the life of the process,
a sixth of wren's whole footprint on the default model, and 0.8 s to parse its tokenizer.json. This class
encodes and decodes exactly as that model does (the tests compare the two on the real vocabulary), for the
one shape of tokenizer Gemma uses: BPE with byte fallback, no pre-tokenizer, spaces written "▁" (and
optionally one prepended), added tokens matched whole. It keeps

* the pieces as one UTF-8 blob and offsets (decode, `id_to_token`), with a sorted CRC-32 index
  (`token_to_id`);
* the merges as sorted (left, right) -> (rank, merged) integer pairs and the one-character pieces by code
  point, which the compiled merge loop (`_bpe.c`) searches;
* the added tokens in a dict, matched leftmost-longest as `tokenizers` matches them.

Two differences, both where `tokenizers` fails: a str with a lone surrogate (JSON can carry one) is encoded
as its bytes instead of raising TypeError, and with a prepended space a normalized added token decodes as its
own piece, not as its normalized text (which `tokenizers` gives a second "▁"; Gemma prepends nothing).
`wren.tokenizer.Tokenizer` uses this class where the compiled `_bpe` module was built, and `tokenizers`
otherwise or with WREN_COMPACT_BPE=0; wren.tokenizer_cache keeps its arrays on disk.
"""

from __future__ import annotations

import operator
import os
import re
import zlib
from typing import NamedTuple

import numpy as np

try:
    from . import _bpe
except ImportError:  # no C compiler at install: wren.tokenizer builds a `tokenizers` model instead
    _bpe = None

ARRAYS = {"blob": np.uint8, "offsets": np.int64, "hashes": np.uint32, "hash_order": np.int32,
          "pair_keys": np.uint64, "pair_vals": np.uint64, "bmp_ids": np.int32, "char_points": np.uint32,
          "char_ids": np.int32, "byte_ids": np.int32, "byte_value": np.int16}
SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space
# What the `tokenizers` ByteFallback decoder reads as one byte: Rust's u8::from_str_radix of the two
# characters between "<0x" and ">", which takes a leading "+".
_BYTE_PIECE = re.compile(r"<0x(\+[0-9A-Fa-f]|[0-9A-Fa-f]{2})>")


def available() -> bool:
    """Whether the compiled merge loop was built (and WREN_COMPACT_BPE=0 does not turn it off)."""
    return _bpe is not None and os.environ.get("WREN_COMPACT_BPE", "1") != "0"


class Added(NamedTuple):
    """An added token: matched whole before BPE, in the raw text (normalized False) or in the text with
    spaces already written "▁" (normalized True); special ones are dropped by decode(skip_special=True)."""

    id: int
    special: bool
    normalized: bool


class _Matcher:
    """Leftmost-longest matching of a set of strings (as `tokenizers` finds added tokens): at the first
    position where any of them starts, the longest one that does."""

    def __init__(self, tokens: dict[str, int]):
        self.tokens = tokens
        # The lengths of the tokens that begin with each two characters (or are that one character), longest
        # first: a space or a newline starts many words but few tokens, so most positions try none.
        lengths: dict[str, set[int]] = {}
        for t in tokens:
            lengths.setdefault(t[:2], set()).add(len(t))
        self.lengths = {head: sorted(ls, reverse=True) for head, ls in lengths.items()}
        firsts = sorted({t[0] for t in tokens})
        self.starts = re.compile("[" + "".join(map(re.escape, firsts)) + "]") if firsts else None

    def split(self, text: str):
        """(segment, None) for the text between matches and (token, id) for each match, in order."""
        if self.starts is None:
            if text:
                yield text, None
            return
        done = 0
        pos = 0
        while (m := self.starts.search(text, pos)) is not None:
            at = m.start()
            head = text[at:at + 2]
            lengths = self.lengths.get(head, []) + (self.lengths.get(head[0], []) if len(head) == 2 else [])
            for n in lengths:
                token_id = self.tokens.get(text[at:at + n])
                if token_id is not None:
                    if at > done:
                        yield text[done:at], None
                    yield text[at:at + n], token_id
                    done = pos = at + n
                    break
            else:
                pos = at + 1
        if done < len(text):
            yield text[done:], None


class CompactBPE:
    """Encode, decode and look up ids as a `tokenizers` BPE model with byte fallback and no pre-tokenizer.

    `build` makes one from pieces and merges; the constructor takes the arrays `build` made (ARRAYS, as
    `arrays` holds them: what wren.tokenizer_cache keeps on disk) and checks every id in them, since the
    compiled loop trusts them."""

    def __init__(self, arrays: dict[str, np.ndarray], added: list[Added], prefix_space: bool, unk_id: int | None):
        if _bpe is None:
            raise RuntimeError("wren._bpe was not built: use the `tokenizers` model")
        if set(arrays) != set(ARRAYS):
            raise ValueError(f"CompactBPE arrays {sorted(arrays)}, not {sorted(ARRAYS)}")
        a = {k: np.ascontiguousarray(arrays[k], dtype=dtype) for k, dtype in ARRAYS.items()}
        self.arrays = a
        n = len(a["offsets"]) - 1
        _check_arrays(a, n, unk_id, added)
        self.prefix_space, self.unk_id = prefix_space, unk_id
        self._blob, self._offsets = a["blob"].tobytes(), a["offsets"]
        self._left_start = np.searchsorted(a["pair_keys"] >> np.uint64(32), np.arange(n + 1, dtype=np.uint64))
        self._tables = (a["pair_keys"].ctypes.data, a["pair_vals"].ctypes.data, self._left_start.ctypes.data, n,
                        a["bmp_ids"].ctypes.data, a["char_points"].ctypes.data, a["char_ids"].ctypes.data,
                        len(a["char_points"]), a["byte_ids"].ctypes.data, -1 if unk_id is None else unk_id)
        self.added = list(added)
        self.special_ids = frozenset(t.id for t in added if t.special)
        self._raw = _Matcher({self.id_to_token(t.id): t.id for t in added if not t.normalized})
        # A normalized added token is matched in normalized text, so its own text is normalized first.
        self._normalized = _Matcher({self._normalize(self.id_to_token(t.id)): t.id for t in added if t.normalized})

    @classmethod
    def build(cls, pieces: list[str], merges: np.ndarray, added: list[Added], prefix_space: bool,
              unk_id: int | None) -> "CompactBPE":
        """From the pieces (by id) and the merges, best first, as rows (left id, right id, merged id)."""
        n = len(pieces)
        vocab = {p: i for i, p in enumerate(pieces)}
        if len(vocab) != n:
            raise ValueError(f"the vocabulary repeats {n - len(vocab)} piece(s)")
        encoded = [p.encode("utf-8", "surrogatepass") for p in pieces]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        hashes = np.fromiter(map(zlib.crc32, encoded), dtype=np.uint32, count=n)
        hash_order = np.argsort(hashes, kind="stable").astype(np.int32)
        pair_keys, pair_vals = _merge_table(np.asarray(merges, dtype=np.int64).reshape(-1, 3), n)
        chars = sorted((ord(p), i) for i, p in enumerate(pieces) if len(p) == 1)
        points = np.array([c for c, _ in chars], dtype=np.uint32)
        ids = np.array([i for _, i in chars], dtype=np.int32)
        bmp_ids = np.full(65536, -1, dtype=np.int32)
        bmp_ids[points[points < 65536]] = ids[points < 65536]
        byte_value = np.full(n, -1, dtype=np.int16)  # the byte a piece decodes to, or -1
        for i, p in enumerate(pieces):
            if len(p) == 6 and (m := _BYTE_PIECE.fullmatch(p)):
                byte_value[i] = int(m.group(1), 16)
        arrays = {
            "blob": np.frombuffer(b"".join(encoded), dtype=np.uint8), "offsets": offsets,
            "hashes": hashes[hash_order], "hash_order": hash_order, "pair_keys": pair_keys, "pair_vals": pair_vals,
            "bmp_ids": bmp_ids, "char_points": points[points >= 65536], "char_ids": ids[points >= 65536],
            "byte_ids": np.array([vocab.get(f"<0x{b:02X}>", -1) for b in range(256)], dtype=np.int32),
            "byte_value": byte_value,
        }
        return cls(arrays, added, prefix_space, unk_id)

    @property
    def vocab_size(self) -> int:
        return len(self._offsets) - 1

    # --- encode ---------------------------------------------------------------------------------

    def _normalize(self, text: str) -> str:
        text = text.replace(" ", SPACE)
        return SPACE + text if self.prefix_space and text else text

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment, token_id in self._raw.split(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            for word, word_id in self._normalized.split(self._normalize(segment)):
                if word_id is not None:
                    ids.append(word_id)
                else:
                    ids += self._encode_word(word)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        points = np.frombuffer(word.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        out = np.empty(4 * len(points), dtype=np.int32)  # byte fallback: up to 4 ids a character
        count = _bpe.encode_word(*self._tables, points.ctypes.data, len(points), out.ctypes.data)
        return out[:count].tolist()

    # --- decode and look up ---------------------------------------------------------------------

    def id_to_token(self, i: int) -> str | None:
        if not 0 <= i < self.vocab_size:
            return None
        return self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8", "surrogatepass")

    def token_to_id(self, token: str) -> int | None:
        needle = token.encode("utf-8", "surrogatepass")
        h, hashes = zlib.crc32(needle), self.arrays["hashes"]
        at = int(np.searchsorted(hashes, h))
        while at < len(hashes) and hashes[at] == h:
            i = int(self.arrays["hash_order"][at])
            if self._blob[self._offsets[i]:self._offsets[i + 1]] == needle:
                return i
            at += 1
        return None

    def decode(self, ids, skip_special: bool = False) -> str:
        """As the `tokenizers` decoders Replace("▁", " "), ByteFallback, Fuse (and Strip(" ", 1, 0) after a
        prepended space): runs of byte pieces become their UTF-8 text, or one U+FFFD a byte if invalid."""
        parts: list[str] = []
        pending = bytearray()
        byte_value = self.arrays["byte_value"]
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size or (skip_special and i in self.special_ids):
                continue
            byte = int(byte_value[i])
            if byte >= 0:
                pending.append(byte)
                continue
            if pending:
                parts.append(_bytes_text(pending))
                pending.clear()
            parts.append(self.id_to_token(i).replace(SPACE, " "))
        if pending:
            parts.append(_bytes_text(pending))
        text = "".join(parts)
        return text[1:] if self.prefix_space and text.startswith(" ") else text

    # --- export ---------------------------------------------------------------------------------

    def pieces(self) -> list[str]:
        return [self.id_to_token(i) for i in range(self.vocab_size)]

    def merge_ids(self) -> np.ndarray:
        """The merges, best first, as `build` takes them (a pair listed twice: once, at its last rank)."""
        order = np.argsort(self.arrays["pair_vals"] >> np.uint64(32), kind="stable")
        keys, vals, low = self.arrays["pair_keys"][order], self.arrays["pair_vals"][order], np.uint64(0xFFFFFFFF)
        return np.stack([keys >> np.uint64(32), keys & low, vals & low], axis=1).astype(np.int64)


def _check_arrays(a: dict[str, np.ndarray], n: int, unk_id: int | None, added: list[Added]) -> None:
    """Raise ValueError unless every offset and id in `a` is in range for a vocabulary of n pieces."""
    def ids_ok(x, low=0):
        return x.size == 0 or (int(x.min()) >= low and int(x.max()) < n)

    offsets, keys, vals, mask = a["offsets"], a["pair_keys"], a["pair_vals"], np.uint64(0xFFFFFFFF)
    shapes = {"byte_value": (n,), "hashes": (n,), "hash_order": (n,), "bmp_ids": (65536,), "byte_ids": (256,),
              "pair_vals": keys.shape, "char_ids": a["char_points"].shape}
    ok = (n >= 1 and offsets[0] == 0 and bool(np.all(np.diff(offsets) >= 0)) and offsets[-1] == len(a["blob"])
          and all(a[k].shape == shape for k, shape in shapes.items())
          and bool(np.all(keys[1:] > keys[:-1])) and bool(np.all(a["char_points"][1:] > a["char_points"][:-1]))
          and ids_ok((keys >> np.uint64(32)).astype(np.int64)) and ids_ok((keys & mask).astype(np.int64))
          and ids_ok((vals & mask).astype(np.int64)) and ids_ok(a["hash_order"]) and ids_ok(a["char_ids"])
          and ids_ok(a["bmp_ids"], -1) and ids_ok(a["byte_ids"], -1) and int(a["byte_value"].max(initial=-1)) < 256
          and (unk_id is None or 0 <= unk_id < n) and all(0 <= t.id < n for t in added))
    if not ok:
        raise ValueError("CompactBPE arrays out of range or out of order")


def _bytes_text(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def merge_ids(merges: list[tuple[str, str]], vocab: dict[str, int]) -> np.ndarray:
    """Merges given as pairs of pieces (a tokenizer.json's, a GGUF's list) as `build` takes them; `vocab` maps
    each piece to its id."""
    n = len(merges)
    lefts, rights = zip(*merges) if merges else ((), ())
    try:
        columns = [np.fromiter(map(vocab.__getitem__, names), dtype=np.int64, count=n)
                   for names in (lefts, rights, map(operator.add, lefts, rights))]
    except KeyError as e:
        raise ValueError(f"a merge names {e.args[0]!r}, which the vocabulary lacks") from None
    return np.stack(columns, axis=1)


def _merge_table(merges: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (left << 32 | right) keys and (rank << 32 | merged) values. A pair listed twice keeps its
    last rank, as `tokenizers` does (its map takes the later entry)."""
    if merges.size and (merges.min() < 0 or merges.max() >= n):
        raise ValueError("a merge names an id outside the vocabulary")
    left, right, merged = (merges[:, k].astype(np.uint64) for k in range(3))
    keys = (left << np.uint64(32)) | right
    vals = (np.arange(len(merges), dtype=np.uint64) << np.uint64(32)) | merged
    order = np.argsort(keys, kind="stable")  # stable: a repeated pair's entries stay in rank order
    keys, vals = keys[order], vals[order]
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[:-1] != keys[1:]
    return np.ascontiguousarray(keys[last]), np.ascontiguousarray(vals[last])
