"""Gemma 4's thought channel is split off the reply on token ids (the markers are control tokens)."""

from wren.server.thinking import Thinking, ThoughtSplitter


class FakeTokenizer:
    ids = {"<|channel>": 100, "<channel|>": 101}

    def token_to_id(self, token):
        return self.ids.get(token)


def split(stream):
    """stream: (token id, detokenized text) pairs, as the server sees them."""
    splitter = ThoughtSplitter(FakeTokenizer())
    out = []
    for token_id, text in stream:
        splitter.token(token_id)
        piece = splitter.text(text) if text else ""
        if piece:
            out.append(piece)
    thinking = "".join(p for p in out if isinstance(p, Thinking))
    answer = "".join(p for p in out if not isinstance(p, Thinking))
    return thinking, answer


def test_thought_channel_goes_to_thinking_without_its_name():
    stream = [(100, ""), (5, "thou"), (6, "ght\n"), (7, "Two and"), (8, " two."), (101, ""), (9, "It is"),
              (10, " four.")]
    assert split(stream) == ("Two and two.", "It is four.")


def test_a_reply_without_the_channel_is_all_answer():
    assert split([(5, "thought"), (6, " and more")]) == ("", "thought and more")


def test_channel_name_split_across_no_newline_is_kept():
    # A channel that is not named `thought` keeps its text.
    assert split([(100, ""), (5, "tho"), (6, "rough"), (101, ""), (7, "x")]) == ("thorough", "x")


def test_a_tokenizer_without_the_markers_never_splits():
    class Plain:
        def token_to_id(self, token):
            return None

    splitter = ThoughtSplitter(Plain())
    splitter.token(100)
    assert type(splitter.text("hello")) is str
