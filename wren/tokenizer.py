"""Text <-> token ids: a CompactBPE (wren/compact_bpe.py) for SentencePiece vocabularies where the compiled
`_bpe` module was built, the HF `tokenizers` library otherwise; both give the same ids.

A GGUF carries no tokenizer.json, only the vocabulary, scores and token types, so `from_gguf_metadata`
rebuilds the tokenizer those describe:

* "llama" (SentencePiece BPE, e.g. Gemma 3) and "gemma4": spaces become "▁", a BPE model with byte
  fallback, and merges derived from the vocabulary and scores when the file lists none -- the pair
  (a, b) merges when a, b and a+b are all pieces, ranked by the score of a+b, best first, which is the
  order SentencePiece itself merges in.
* "gpt2": byte-level BPE with the file's merges (the pre-tokenizer regex is GPT-2's, an approximation
  for models that state another `tokenizer.ggml.pre`).

Control tokens become special added tokens and user-defined ones plain added tokens, so both match
whole in text ("<start_of_turn>" -> 105) instead of being cut into pieces.

`StreamDetokenizer` turns ids into text one at a time for streaming output without ever showing a
half-decoded multi-byte character.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from wren import compact_bpe
from wren.compact_bpe import Added, CompactBPE, merge_ids
from wren.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space

_SENTENCEPIECE_MODELS = ("llama", "gemma4")
# Names to guess special ids by when a tokenizer.json is all we have (it does not say which is BOS).
_GUESS = {
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
}


def sentencepiece_merges(tokens: list[str], scores: np.ndarray, mergeable: np.ndarray) -> np.ndarray:
    """BPE merges implied by a SentencePiece vocabulary, best first: int64 rows (left id, right id, merged id).

    Only `mergeable` pieces (normal ones) take part: SentencePiece never merges control, byte or
    user-defined pieces, and leaving them out also keeps a literal "<0x0A>" in text from becoming
    the newline byte token.
    """
    ids = np.flatnonzero(mergeable)
    # Higher score first, ties by id. Sorting the pieces rather than the ~500k merges keeps this fast.
    ids = ids[np.lexsort((ids, -scores[ids].astype(np.float64)))]
    id_of = {tokens[i]: i for i in ids.tolist()}
    lefts, rights, merged = [], [], []
    for i in ids.tolist():
        piece = tokens[i]
        # All ways to build this piece from two pieces share its rank; longer left part first, as
        # transformers orders them, so both produce identical tokenizers.
        for cut in range(len(piece) - 1, 0, -1):
            left = id_of.get(piece[:cut])
            if left is not None and (right := id_of.get(piece[cut:])) is not None:
                lefts.append(left)
                rights.append(right)
                merged.append(i)
    return np.array([lefts, rights, merged], dtype=np.int64).reshape(3, -1).T


def _meta_int(meta: dict, key: str, n_tokens: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ModelFormatError(f"GGUF tokenizer metadata {key} is {value!r}, not a token id") from None
    if not 0 <= value < n_tokens:
        raise ModelFormatError(f"GGUF tokenizer metadata {key} = {value} is not in the {n_tokens}-token vocab")
    return value


def _meta_array(meta: dict, key: str, n_tokens: int, dtype) -> np.ndarray | None:
    value = meta.get(key)
    if value is None:
        return None
    value = np.asarray(value, dtype=dtype)
    if value.shape != (n_tokens,):
        raise ModelFormatError(
            f"GGUF tokenizer metadata {key} has shape {value.shape}; the vocabulary needs ({n_tokens},)"
        )
    return value


class Tokenizer:
    """Text <-> ids through a CompactBPE or a `tokenizers.Tokenizer`, plus the special ids a runtime needs."""

    def __init__(self, model: CompactBPE | _HFTokenizer, bos_id=None, eos_id=None, pad_id=None, special_ids=()):
        self._bpe = model if isinstance(model, CompactBPE) else None
        self._hf = None if self._bpe is not None else model
        self.vocab_size: int = self._bpe.vocab_size if self._bpe is not None else \
            self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self._special = frozenset(special_ids)

    @property
    def compact_model(self) -> CompactBPE | None:
        """The CompactBPE that holds the vocabulary, or None where the `tokenizers` library does."""
        return self._bpe

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ModelFormatError("GGUF has no tokenizer.ggml.model: the file carries no tokenizer")
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens) == 0:
            raise ModelFormatError("GGUF has no tokenizer vocabulary: tokenizer.ggml.tokens missing or empty")
        tokens = list(tokens)
        if not all(isinstance(t, str) for t in tokens):
            raise ModelFormatError("GGUF tokenizer.ggml.tokens holds something other than strings")
        n = len(tokens)
        types = _meta_array(meta, "tokenizer.ggml.token_type", n, np.int32)
        if types is None:
            types = np.full(n, NORMAL, dtype=np.int32)
        unk_id = _meta_int(meta, "tokenizer.ggml.unknown_token_id", n)
        ids = {k: _meta_int(meta, f"tokenizer.ggml.{k}_token_id", n) for k in ("bos", "eos", "padding")}
        # Control tokens are special (skippable on decode); user-defined ones are ordinary text that
        # must still match whole. Both bypass BPE.
        special_ids = np.flatnonzero(types == CONTROL).tolist()

        if model in _SENTENCEPIECE_MODELS:
            built = cls._sentencepiece(meta, tokens, types, unk_id, special_ids)
        elif model == "gpt2":
            built = cls._byte_level(meta, tokens)
            built.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_ids])
        else:
            raise UnsupportedModelError(
                f"wren cannot build a tokenizer of type {model!r} (supported: llama, gemma4, gpt2)"
            )
        return cls(built, ids["bos"], ids["eos"], ids["padding"], special_ids)

    @staticmethod
    def _sentencepiece(meta, tokens, types, unk_id, special_ids) -> CompactBPE | _HFTokenizer:
        n = len(tokens)
        # A user-defined piece of spaces is stored as "  " (llama.cpp un-escapes it); spell it "▁▁"
        # as SentencePiece does, so it can match the space-escaped text.
        user = np.flatnonzero(types == USER_DEFINED).tolist()
        for i in user:
            t = tokens[i]
            if " " in t and not t.strip(" "):
                tokens[i] = SPACE * len(t)
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != n:
            raise ModelFormatError(f"GGUF tokenizer vocabulary repeats {n - len(vocab)} token(s)")
        listed = meta.get("tokenizer.ggml.merges")
        if listed is not None and len(listed):  # may be a list or an array: no truth test
            try:
                merges = merge_ids([tuple(str(m).split(" ", 1)) for m in listed], vocab)
            except ValueError as e:
                raise ModelFormatError(f"GGUF tokenizer.ggml.merges: {e}") from None
        else:
            scores = _meta_array(meta, "tokenizer.ggml.scores", n, np.float32)
            if scores is None:  # no scores: the vocabulary's order is the merge order
                scores = -np.arange(n, dtype=np.float32)
            merges = sentencepiece_merges(tokens, scores, types == NORMAL)
        if unk_id is None:
            unk_id = vocab.get("<unk>")
        # Pieces of spaces match the escaped text ("▁▁"), the rest the raw text. Longest match wins, as in
        # SentencePiece: 40 spaces -> the 31-space piece + the 9-space one.
        added = [Added(i, True, False) for i in special_ids] + [Added(i, False, SPACE in tokens[i]) for i in user]
        # llama.cpp assumes a space prefix for a "llama" vocabulary unless told otherwise (Gemma 3
        # says False); Gemma 4 has none.
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", meta["tokenizer.ggml.model"] == "llama"))
        return _sentencepiece_model(tokens, merges, added, prefix, unk_id)

    @staticmethod
    def _byte_level(meta, tokens) -> _HFTokenizer:
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None or not len(merges):
            raise ModelFormatError("GGUF byte-level (gpt2) tokenizer lists no tokenizer.ggml.merges")
        vocab = {t: i for i, t in enumerate(tokens)}
        hf = _HFTokenizer(BPE(vocab, [tuple(str(m).split(" ", 1)) for m in merges]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        return hf

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """Load an HF tokenizer.json. BOS/EOS/PAD are guessed from the usual token names."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"no tokenizer file at {path}")
        model = _compact_from_json(path) if compact_bpe.available() else None
        if model is None:
            try:
                model = _HFTokenizer.from_file(path)
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise ModelFormatError(f"{path} is not a valid tokenizer.json: {e}") from None
            special = [i for i, t in model.get_added_tokens_decoder().items() if t.special]
        else:
            special = sorted(model.special_ids)
        tok = cls(model, special_ids=special)
        found = {k: [i for i in map(tok.token_to_id, names) if i is not None] for k, names in _GUESS.items()}
        tok.bos_id, tok.eos_id, tok.pad_id = (found[k][0] if found[k] else None for k in ("bos", "eos", "pad"))
        return tok

    def save(self, path) -> None:
        """Write an HF tokenizer.json (readable by `from_file` and by transformers)."""
        hf = self._hf
        if hf is None:
            b = self._bpe
            hf = _sentencepiece_hf(b.pieces(), b.merge_ids(), b.added, b.prefix_space, b.unk_id)
        hf.save(os.fspath(path))

    # --- use ----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._bpe.encode(text) if self._bpe is not None else self._hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """The text of `ids`; ids outside the vocabulary are dropped."""
        if self._bpe is not None:
            return self._bpe.decode(ids, skip_special)
        return self._hf.decode([i for i in map(int, ids) if i >= 0], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return (self._bpe or self._hf).token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return (self._bpe or self._hf).id_to_token(int(i)) if 0 <= int(i) < self.vocab_size else None

    def is_special(self, i: int) -> bool:
        return int(i) in self._special


def _sentencepiece_model(pieces, merges, added, prefix: bool, unk_id) -> CompactBPE | _HFTokenizer:
    if compact_bpe.available():
        return CompactBPE.build(pieces, merges, added, prefix, unk_id)
    return _sentencepiece_hf(pieces, merges, added, prefix, unk_id)


def _sentencepiece_hf(pieces, merges: np.ndarray, added, prefix: bool, unk_id) -> _HFTokenizer:
    """The `tokenizers` model a CompactBPE of the same arguments encodes as."""
    vocab = {t: i for i, t in enumerate(pieces)}
    unk = pieces[unk_id] if unk_id is not None else None
    pairs = [(pieces[a], pieces[b]) for a, b in merges[:, :2].tolist()]
    hf = _HFTokenizer(BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", SPACE)
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # undo the prefix
    hf.decoder = decoders.Sequence(steps)
    hf.add_special_tokens([AddedToken(pieces[a.id], special=True, normalized=False) for a in added if a.special])
    hf.add_tokens([AddedToken(pieces[a.id], special=False, normalized=a.normalized) for a in added if not a.special])
    return hf


_REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
_DECODE_STEPS = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                 {"type": "Fuse"}]
_STRIP_PREFIX = {"type": "Strip", "content": " ", "start": 1, "stop": 0}


def _compact_from_json(path: str) -> CompactBPE | None:
    """A CompactBPE of a tokenizer.json of the SentencePiece shape (what `save` writes for Gemma), or None
    for any other, and for a file that is not JSON: `tokenizers` then reads it (and says what is wrong)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        model = data["model"]
        if not (model.get("type") == "BPE" and model.get("byte_fallback") is True and model.get("dropout") is None
                and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
                and not model.get("ignore_merges") and (model.get("fuse_unk") or model.get("unk_token") is None)
                and data.get("pre_tokenizer") is None and data.get("truncation") is None
                and data.get("padding") is None):
            return None
        normalizer, decoder = data.get("normalizer"), data.get("decoder") or {}
        if normalizer == _REPLACE_SPACE:
            prefix = False
        elif normalizer == {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE},
                                                                _REPLACE_SPACE]}:
            prefix = True
        else:
            return None
        if decoder != {"type": "Sequence", "decoders": _DECODE_STEPS + [_STRIP_PREFIX] * prefix}:
            return None
        vocab = model["vocab"]
        n = len(vocab)
        if set(vocab.values()) != set(range(n)):  # ids 0..n-1, each once
            return None
        pieces = [""] * n
        for piece, i in vocab.items():
            pieces[i] = piece
        merges = merge_ids([tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                            for m in model.get("merges", [])], vocab)
        added = []
        for t in data.get("added_tokens", []):
            if t["lstrip"] or t["rstrip"] or t["single_word"] or not 0 <= t["id"] < n:
                return None
            if pieces[t["id"]] != t["content"]:
                return None
            added.append(Added(t["id"], bool(t["special"]), bool(t["normalized"])))
        unk = model.get("unk_token")
        del data, model
        return CompactBPE.build(pieces, merges, added, prefix, vocab[unk] if unk is not None else None)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


class StreamDetokenizer:
    """Incremental decode for streaming.

    Each push decodes the tokens not yet emitted together with the last emitted chunk as context
    (a decoder may strip the leading space of a first token) and emits only the new text -- unless
    it ends in U+FFFD, which means a character whose bytes are still arriving.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens before this have been emitted

    def _text(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self._ids[start:end], skip_special=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._text(self._prefix, self._read)
        text = self._text(self._prefix)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        done = self._text(self._prefix, self._read)
        text = self._text(self._prefix)
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
