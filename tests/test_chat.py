"""Chat templates: the built-in Gemma 3 and Gemma 4 formats, loss masks, a checkpoint's jinja template,
stop strings, and the text stream."""

from __future__ import annotations

import pytest

from wren import chat
from wren.errors import BadOptionError
from wren.generation import StopStrings

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def test_gemma3_template_folds_system_into_first_user_turn():
    text = chat.render_text(CONVO, chat.GEMMA3)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello!<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_gemma4_template_has_system_turn_and_thinking_switch():
    text = chat.render_text(CONVO, chat.GEMMA4)
    assert text == ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n"
                    "<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n")
    thinking = chat.render_text(CONVO[1:2], chat.GEMMA4, think=True)
    assert thinking.startswith("<bos><|turn>system\n<|think|><turn|>\n")


class CharTokenizer:
    """One id per character; enough to check that masks line up with the text."""

    bos_id, eos_id = None, None

    def encode(self, text, add_bos=False):
        return [ord(c) for c in text]

    def id_to_token(self, i):
        return chr(i)

    def token_to_id(self, t):
        return ord(t) if len(t) == 1 else None


def test_loss_mask_covers_only_assistant_replies():
    ids, mask = chat.render(CONVO, CharTokenizer(), chat.GEMMA3, add_generation_prompt=False)
    learned = "".join(chr(i) for i, m in zip(ids, mask) if m)
    assert learned == "Hello!<end_of_turn>"


def test_checkpoint_jinja_template_is_used():
    template = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    ids, _ = chat.render(CONVO[1:2], CharTokenizer(), template)
    assert "".join(map(chr, ids)) == "[user:Hi]>"
    with pytest.raises(BadOptionError):
        chat.render(CONVO, CharTokenizer(), "{{ raise_exception('no system role') }}")


@pytest.mark.parametrize("bad", [[{"content": "x"}], [{"role": "wizard", "content": "x"}],
                                 [{"role": "user", "content": 5}],
                                 [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]])
def test_bad_messages_raise(bad):
    with pytest.raises(BadOptionError):
        chat.render_text(bad, chat.GEMMA3)


def test_stop_strings_hold_back_possible_prefixes():
    s = StopStrings(["</end>"])
    assert s.push("hello </e") == ("hello ", False)
    assert s.push("nd> more") == ("", True)
    t = StopStrings(["XY"])
    assert t.push("aX") == ("a", False)
    assert t.push("b") == ("Xb", False)
    assert t.flush() == ""


def test_round_trip_through_real_tokenizer(tiny):
    import wren

    model = wren.load(tiny["gemma4-e2b"][2])
    ids, mask = chat.render(CONVO, model.tokenizer, chat.GEMMA4, add_generation_prompt=False)
    assert model.tokenizer.decode(ids) == chat.render_text(CONVO, chat.GEMMA4, add_generation_prompt=False)
    assert model.tokenizer.token_to_id("<turn|>") in chat.stop_ids(model.tokenizer, chat.GEMMA4)
    assert model.tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<turn|>"
