"""Gemma 4's thought channel, split off the reply for Ollama's `thinking` field.

A thinking Gemma 4 writes `<|channel>thought\\n ... <channel|>` before its answer. The two markers are
control tokens (the detokenizer drops them), so the split is made on token ids; the word `thought` and the
newline that name the channel are removed from the thinking text. A model without those tokens never
splits.
"""

from __future__ import annotations

OPEN, CLOSE = "<|channel>", "<channel|>"
CHANNEL_NAME = "thought"


class Thinking(str):
    """A piece of the model's thinking (a str, so code that only joins text keeps working)."""


class ThoughtSplitter:
    def __init__(self, tokenizer):
        self.open_id = tokenizer.token_to_id(OPEN)
        self.close_id = tokenizer.token_to_id(CLOSE)
        self.inside = False
        self._head = None  # the thinking text seen so far, until the channel name is stripped

    def token(self, token_id: int) -> None:
        """Call with every generated id before its text is pushed."""
        if self.open_id is not None and token_id == self.open_id:
            self.inside, self._head = True, ""
        elif self.close_id is not None and token_id == self.close_id and self.inside:
            self.inside = False

    def text(self, piece: str) -> str:
        """The piece, as a Thinking when it belongs to the thought channel; '' while the name is held."""
        if not self.inside:
            return piece
        if self._head is not None:
            self._head += piece
            name = CHANNEL_NAME + "\n"
            if len(self._head) < len(name) and name.startswith(self._head):
                return ""  # could still be the channel's name: wait for more
            piece = self._head.removeprefix(name) if self._head.startswith(name) else self._head
            self._head = None
        return Thinking(piece) if piece else ""
