"""The compact tokenizer (wren/compact_bpe.py, wren/_bpe.c) against the `tokenizers` model of the same vocabulary,
and its on-disk cache (wren/tokenizer_cache.py).

Every check builds both from the same source, the `tokenizers` one with the compiled module switched off, as a
machine without a C compiler would, and compares ids, text and lookups.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from wren import compact_bpe, tokenizer_cache
from wren.compact_bpe import Added, CompactBPE, merge_ids
from wren.tokenizer import Tokenizer
from wren.weights.gguf import GGUFFile, tokenizer_metadata

pytestmark = pytest.mark.skipif(not compact_bpe.available(),
                                reason="the compact tokenizer is off: wren._bpe was not built, or WREN_COMPACT_BPE=0")

SAMPLES = [
    "Hello, world! This is a plain English sentence.",
    "def f(x):\n    if x:\n\treturn x * 2\n    return None\n",
    "a  b   c    d        e" + " " * 40 + "f",
    "   leading and trailing spaces   ",
    "Emoji: 😀🫠🧑‍🚀🇺🇳 🦩🧌, CJK 中文测试 日本語 한국어, Café Straße Ærøskøbing",
    "Rare: ꙮ Ṩ 𠀀 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x07 zero\u200bwidth",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n<bos><eos>",
    "Mixed: x<y && y>z; </div> <b>bold</b> <0x0A> literal <unused12> <start_of_turn",
    "\n\n\n\n\n\n\n\n\n\n\n\t\t\t\t  \n \n",
    "",
]


def both(build):
    """(compact, tokenizers) built by `build()`."""
    compact = build()
    saved, compact_bpe._bpe = compact_bpe._bpe, None
    try:
        reference = build()
    finally:
        compact_bpe._bpe = saved
    assert compact.compact_model is not None and reference.compact_model is None
    return compact, reference


def assert_same(compact, reference, texts, id_runs):
    assert compact.vocab_size == reference.vocab_size
    assert (compact.bos_id, compact.eos_id, compact.pad_id) == (reference.bos_id, reference.eos_id, reference.pad_id)
    for text in texts:
        assert compact.encode(text) == reference.encode(text), repr(text[:80])
    for ids in id_runs:
        for skip in (False, True):
            assert compact.decode(ids, skip_special=skip) == reference.decode(ids, skip_special=skip), ids[:20]


def random_texts(pieces: list[str], seed: int, count: int = 60) -> list[str]:
    """Runs of random pieces and random characters of the vocabulary: strings that make the merges compete."""
    rng = random.Random(seed)
    chars = sorted({c for p in pieces for c in p})
    texts = []
    for _ in range(count):
        words = [rng.choice(pieces).replace("\u2581", " ") if rng.random() < 0.7
                 else "".join(rng.choice(chars) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 30))]
        texts.append("".join(words))
    return texts


# --- the real Gemma 3 vocabulary ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3(default_gguf):
    meta = tokenizer_metadata(GGUFFile(default_gguf))
    return both(lambda: Tokenizer.from_gguf_metadata(meta))


@pytest.mark.slow
def test_gemma3_matches_tokenizers(gemma3):
    compact, reference = gemma3
    book = Path(__file__).resolve().parents[2] / "shared" / "data" / "prideprejudice.txt"
    pieces = [compact.id_to_token(i) for i in range(0, compact.vocab_size, 7)]
    texts = SAMPLES + random_texts(pieces, seed=1)
    if book.exists():
        texts.append(book.read_text(encoding="utf-8")[:50_000])
    rng = np.random.default_rng(2)
    byte_ids = [compact.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    id_runs = [rng.integers(0, compact.vocab_size, 40).tolist() for _ in range(50)]
    id_runs += [rng.choice(byte_ids, 12).tolist() for _ in range(50)]  # valid and invalid UTF-8 byte runs
    id_runs += [[105, 2364, 107, 236743, *byte_ids[0xF0:0xF2], 106, -1, 10**7], []]
    assert_same(compact, reference, texts, id_runs)


@pytest.mark.slow
def test_lone_surrogates_fall_back_to_bytes(gemma3):
    # `tokenizers` refuses a str holding one (TypeError); JSON can carry them ("\\ud800"). The compact model
    # encodes its UTF-8 bytes, which decode as invalid: one U+FFFD each.
    compact, _ = gemma3
    ids = compact.encode("a\ud800b")
    assert [compact.id_to_token(i) for i in ids[1:4]] == ["<0xED>", "<0xA0>", "<0x80>"]
    assert compact.decode(ids) == "a\ufffd\ufffd\ufffdb"


@pytest.mark.slow
def test_gemma3_lookups(gemma3):
    compact, reference = gemma3
    for i in list(range(0, compact.vocab_size, 97)) + [0, 1, 2, 105, 106, compact.vocab_size - 1]:
        token = reference.id_to_token(i)
        assert compact.id_to_token(i) == token
        assert compact.token_to_id(token) == reference.token_to_id(token) == i
    for token in ["<no such token>", "", "\u2581" * 40, "x" * 500]:
        assert compact.token_to_id(token) == reference.token_to_id(token)
    assert compact.special_ids == reference.special_ids


@pytest.mark.slow
def test_gemma3_saved_json_is_read_compact(gemma3, tmp_path):
    compact, reference = gemma3
    path = tmp_path / "tokenizer.json"
    compact.save(path)  # written through `tokenizers` from the compact arrays
    again, from_reference = both(lambda: Tokenizer.from_file(path))
    assert_same(again, from_reference, SAMPLES, [])
    assert_same(again, reference, SAMPLES, [[105, 2364, 106, 1]])


# --- small vocabularies: the corners --------------------------------------------------------------

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def tiny(pieces, merges, *, prefix=False, unk=True, byte_pieces=True, added=()):
    head = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n", "\u2581\u2581"]
    vocab = head + (BYTES if byte_pieces else []) + pieces
    added = [Added(4, True, False), Added(5, False, False), Added(6, False, True), *added]
    unk_id = 3 if unk else None

    ids = merge_ids(merges, {p: i for i, p in enumerate(vocab)})

    def build():
        model = compact_bpe.CompactBPE.build(vocab, ids, added, prefix, unk_id) if compact_bpe.available() else \
            _hf(vocab, ids, added, prefix, unk_id)
        return Tokenizer(model, 2, 1, 0, [0, 1, 2, 4])

    return both(build), vocab


def _hf(vocab, merges, added, prefix, unk_id):
    from wren.tokenizer import _sentencepiece_hf

    return _sentencepiece_hf(vocab, merges, added, prefix, unk_id)


TINY_TEXTS = ["abc", "abcabc", "aaaa", "ab ab  ab", " ab", "a\nb", "é", "xyz é ab", "<start_of_turn>ab", "",
              "  ", "a   b", "b c a c a b"]


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("unk,byte_pieces", [(True, True), (True, False), (False, False)])
def test_tiny_vocabularies_match_tokenizers(prefix, unk, byte_pieces):
    pieces = ["\u2581", "a", "b", "c", "ab", "bc", "abc", "\u2581a", "\u2581ab", "aa", "aaa"]
    merges = [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc"), ("\u2581", "a"), ("\u2581a", "b"), ("a", "a"),
              ("aa", "a")]
    (compact, reference), vocab = tiny(pieces, merges, prefix=prefix, unk=unk, byte_pieces=byte_pieces)
    runs = [[7 + i for i in range(len(vocab) - 7)], [2, 4, 0x41 + 7, 0xC3 + 7, 0xA9 + 7, 5, 6, 3, 3, 1]]
    if prefix:  # `tokenizers` decodes a normalized added token as its normalized text, prefix and all (below)
        runs = [[i for i in run if i != 6] for run in runs]
    assert_same(compact, reference, TINY_TEXTS + random_texts(pieces, seed=3), runs)


def test_a_normalized_added_token_decodes_as_its_piece():
    # With a prepended space, `tokenizers` stores "▁▁" as "▁▁▁" (id_to_token says so too) and decodes one as
    # three spaces less the prefix's one. The compact model matches the same text but decodes the piece itself,
    # as SentencePiece and llama.cpp do. (Gemma prepends nothing, so both agree there.)
    (compact, reference), _ = tiny(["\u2581", "a"], [], prefix=True)
    assert compact.encode("  ") == reference.encode("  ") == [6]
    assert compact.decode([5, 6]) == "\n  " and reference.decode([5, 6]) == "\n   "


def test_unknown_characters_beside_a_partial_byte_table():
    # Only some "<0xXX>" pieces: "€" has no bytes, so it is unknown (and fuses with the next unknown), while "é"
    # falls back to its bytes, which `tokenizers` puts before a pending unknown.
    def build():
        vocab, no_merges = ["<unk>", "<0xC3>", "<0xA9>", "a"], merge_ids([], {})
        if compact_bpe.available():
            return Tokenizer(CompactBPE.build(vocab, no_merges, [], False, 0))
        return Tokenizer(_hf(vocab, no_merges, [], False, 0))

    compact, reference = both(build)
    for text in ["€é", "€éa", "€€a€", "é€é", "a€"]:
        assert compact.encode(text) == reference.encode(text), text


def test_a_pair_listed_twice_keeps_its_last_rank():
    pieces = ["a", "b", "c", "ab", "bc"]
    for merges in ([("a", "b"), ("b", "c"), ("a", "b")], [("b", "c"), ("a", "b"), ("b", "c")]):
        (compact, reference), _ = tiny(pieces, merges)
        assert compact.encode("abc") == reference.encode("abc")


def test_normalized_added_tokens_are_matched_after_the_prefix():
    (compact, reference), vocab = tiny(["\u2581", "a", "\u2581\u2581a"], [], prefix=True,
                                       added=[Added(7 + 256 + 2, False, True)])
    for text in ["a", " a", "  a", "x  a"]:
        assert compact.encode(text) == reference.encode(text)


def test_bad_arrays_are_refused():
    (compact, _), _ = tiny(["a", "b", "ab"], [("a", "b")])
    model = compact.compact_model
    for name, change in [("pair_vals", lambda a: a + np.uint64(10**6)), ("bmp_ids", lambda a: a + 10**6),
                         ("offsets", lambda a: a[::-1].copy()), ("byte_ids", lambda a: a[:10])]:
        arrays = dict(model.arrays, **{name: change(model.arrays[name])})
        with pytest.raises(ValueError):
            CompactBPE(arrays, model.added, model.prefix_space, model.unk_id)
    with pytest.raises(ValueError):
        CompactBPE(model.arrays, [Added(10**6, True, False)], False, None)


def test_other_tokenizer_json_shapes_stay_with_tokenizers(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    hf = HF(BPE({"h": 0, "i": 1, "hi": 2}, [("h", "i")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    assert Tokenizer.from_file(path).compact_model is None
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = None
    data["model"]["vocab"]["h"] = -5  # ids not 0..n-1: not the compact shape, and `tokenizers` says what is wrong
    path.write_text(json.dumps(data))
    with pytest.raises(Exception):
        Tokenizer.from_file(path)


# --- the cache ------------------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WREN_TOKENIZER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting(build):
    calls = []

    def counted():
        calls.append(1)
        return build()

    return counted, calls


def test_cache_builds_once_then_reads(cache_dir, tmp_path):
    (compact, _), _ = tiny(["\u2581", "a", "b", "ab"], [("a", "b")], prefix=True)
    source = tmp_path / "tokenizer.json"
    compact.save(source)
    build, calls = counting(lambda: Tokenizer.from_file(source))
    first = tokenizer_cache.load(source, build)
    second = tokenizer_cache.load(source, build)
    assert len(calls) == 1 and len(list(cache_dir.glob("*.npz"))) == 1
    assert second.compact_model is not None and second.special_ids == first.special_ids
    assert (second.bos_id, second.eos_id, second.pad_id) == (first.bos_id, first.eos_id, first.pad_id)
    for text in TINY_TEXTS:
        assert second.encode(text) == first.encode(text) and second.decode(first.encode(text)) == first.decode(
            first.encode(text))
    os.utime(source, ns=(1, 1))  # a rewritten source is a new entry
    tokenizer_cache.load(source, build)
    assert len(calls) == 2 and len(list(cache_dir.glob("*.npz"))) == 2


def test_cache_rebuilds_over_a_corrupt_file(cache_dir, tmp_path):
    (compact, _), _ = tiny(["a", "b", "ab"], [("a", "b")])
    source = tmp_path / "tokenizer.json"
    compact.save(source)
    build, calls = counting(lambda: Tokenizer.from_file(source))
    tokenizer_cache.load(source, build)
    (entry,) = cache_dir.glob("*.npz")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    again = tokenizer_cache.load(source, build)
    assert len(calls) == 2 and again.encode("ab") == compact.encode("ab")
    entry.write_bytes(b"not a zip")
    assert tokenizer_cache.load(source, build).encode("ab") == compact.encode("ab") and len(calls) == 3


def test_cache_unwritable_or_unbuilt_still_loads(tmp_path, monkeypatch):
    (compact, _), _ = tiny(["a", "b", "ab"], [("a", "b")])
    source = tmp_path / "tokenizer.json"
    compact.save(source)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("WREN_TOKENIZER_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    assert tokenizer_cache.load(source, lambda: Tokenizer.from_file(source)).encode("ab") == compact.encode("ab")
    expected = compact.encode("ab")
    monkeypatch.setattr(compact_bpe, "_bpe", None)
    plain = tokenizer_cache.load(source, lambda: Tokenizer.from_file(source))
    assert plain.compact_model is None and plain.encode("ab") == expected
