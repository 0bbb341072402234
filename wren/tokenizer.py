"""Text <-> token ids, built on the HF `tokenizers` library.

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

import os

import numpy as np
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

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


def sentencepiece_merges(tokens: list[str], scores: np.ndarray, mergeable: np.ndarray) -> list[tuple]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    Only `mergeable` pieces (normal ones) take part: SentencePiece never merges control, byte or
    user-defined pieces, and leaving them out also keeps a literal "<0x0A>" in text from becoming
    the newline byte token.
    """
    ids = np.flatnonzero(mergeable)
    # Higher score first, ties by id. Sorting the pieces rather than the ~500k merges keeps this fast.
    ids = ids[np.lexsort((ids, -scores[ids].astype(np.float64)))]
    pieces = {tokens[i] for i in ids.tolist()}
    merges = []
    for i in ids.tolist():
        piece = tokens[i]
        # All ways to build this piece from two pieces share its rank; longer left part first, as
        # transformers orders them, so both produce identical tokenizers.
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                merges.append((left, right))
    return merges


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
    """A wrapped `tokenizers.Tokenizer` plus the special ids a runtime needs."""

    def __init__(self, hf: _HFTokenizer, bos_id=None, eos_id=None, pad_id=None, special_ids=()):
        self._hf = hf
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self._special = frozenset(special_ids)

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

        if model in _SENTENCEPIECE_MODELS:
            hf = cls._sentencepiece(meta, tokens, types, unk_id)
        elif model == "gpt2":
            hf = cls._byte_level(meta, tokens)
        else:
            raise UnsupportedModelError(
                f"wren cannot build a tokenizer of type {model!r} (supported: llama, gemma4, gpt2)"
            )

        # Control tokens are special (skippable on decode); user-defined ones are ordinary text that
        # must still match whole. Both bypass BPE.
        special_ids = np.flatnonzero(types == CONTROL).tolist()
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_ids])
        if model in _SENTENCEPIECE_MODELS:
            # Pieces of spaces match the escaped text ("▁▁"), the rest the raw text. Longest match
            # wins, as in SentencePiece: 40 spaces -> the 31-space piece + the 9-space one.
            user = np.flatnonzero(types == USER_DEFINED).tolist()
            hf.add_tokens([AddedToken(tokens[i], special=False, normalized=SPACE in tokens[i]) for i in user])
        return cls(hf, ids["bos"], ids["eos"], ids["padding"], special_ids)

    @staticmethod
    def _sentencepiece(meta, tokens, types, unk_id) -> _HFTokenizer:
        n = len(tokens)
        # A user-defined piece of spaces is stored as "  " (llama.cpp un-escapes it); spell it "▁▁"
        # as SentencePiece does, so it can match the space-escaped text.
        for i in np.flatnonzero(types == USER_DEFINED).tolist():
            t = tokens[i]
            if " " in t and not t.strip(" "):
                tokens[i] = SPACE * len(t)
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != n:
            raise ModelFormatError(f"GGUF tokenizer vocabulary repeats {n - len(vocab)} token(s)")
        listed = meta.get("tokenizer.ggml.merges")
        if listed is not None and len(listed):  # may be a list or an array: no truth test
            merges = [tuple(str(m).split(" ", 1)) for m in listed]
        else:
            scores = _meta_array(meta, "tokenizer.ggml.scores", n, np.float32)
            if scores is None:  # no scores: the vocabulary's order is the merge order
                scores = -np.arange(n, dtype=np.float32)
            merges = sentencepiece_merges(tokens, scores, types == NORMAL)
        unk = tokens[unk_id] if unk_id is not None else ("<unk>" if "<unk>" in vocab else None)
        hf = _HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        # llama.cpp assumes a space prefix for a "llama" vocabulary unless told otherwise (Gemma 3
        # says False); Gemma 4 has none.
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", meta["tokenizer.ggml.model"] == "llama"))
        replace = normalizers.Replace(" ", SPACE)
        hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))  # undo the prefix
        hf.decoder = decoders.Sequence(steps)
        return hf

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
        try:
            hf = _HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFormatError(f"{path} is not a valid tokenizer.json: {e}") from None
        special = [i for i, t in hf.get_added_tokens_decoder().items() if t.special]
        found = {k: [i for i in map(hf.token_to_id, names) if i is not None] for k, names in _GUESS.items()}
        first = {k: ids[0] if ids else None for k, ids in found.items()}
        return cls(hf, first["bos"], first["eos"], first["pad"], special)

    def save(self, path) -> None:
        """Write an HF tokenizer.json (readable by `from_file` and by transformers)."""
        self._hf.save(os.fspath(path))

    # --- use ----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(int(i)) if 0 <= int(i) < self.vocab_size else None

    def is_special(self, i: int) -> bool:
        return int(i) in self._special


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
