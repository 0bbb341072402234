"""Chat templates: messages -> token ids, plus the mask of tokens a fine-tune learns from.

Gemma 3 (`<start_of_turn>role ... <end_of_turn>`) and Gemma 4 (`<|turn>role ... <turn|>`, a system turn,
the `<|think|>` switch and the thought channel) are built in. A checkpoint's own jinja template is used
when it has one. One function renders both for inference and for training, so the two never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadOptionError

ROLES = ("system", "user", "assistant", "model", "tool")


@dataclass(frozen=True)
class Template:
    name: str
    turn_start: str
    turn_end: str
    system_role: str | None  # None: the system prompt is folded into the first user turn
    stop_tokens: tuple[str, ...]


GEMMA3 = Template("gemma3", "<start_of_turn>", "<end_of_turn>", None, ("<end_of_turn>", "<eos>"))
GEMMA4 = Template("gemma4", "<|turn>", "<turn|>", "system", ("<turn|>", "<eos>"))
BUILTIN = {"gemma3": GEMMA3, "gemma4": GEMMA4}
THINK = "<|think|>"


def _content(message) -> str:
    if not isinstance(message, dict) or "role" not in message:
        raise BadOptionError(f"each message needs a 'role' and 'content', got {message!r}")
    content = message.get("content", "")
    if isinstance(content, list):  # OpenAI-style content parts: keep the text ones
        if any(isinstance(p, dict) and p.get("type") not in (None, "text") for p in content):
            raise BadOptionError("only text content is supported: this model build has no vision or audio")
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise BadOptionError(f"message content must be text, got {type(content).__name__}")
    return content


def segments(messages: list[dict], template: Template, add_generation_prompt: bool = True,
             think: bool = False) -> list[tuple[str, bool]]:
    """The conversation as (text, trainable) pieces; trainable pieces are the assistant's replies."""
    messages = list(messages)
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadOptionError(f"unknown message role in {m!r}; use one of {ROLES}")
    system = ""
    if messages and messages[0]["role"] == "system":
        system = _content(messages.pop(0))
    if think and template.system_role:
        system = THINK + ("\n" + system if system else "")
    out: list[tuple[str, bool]] = [("<bos>", False)]
    if system and template.system_role:
        out.append((f"{template.turn_start}{template.system_role}\n{system}{template.turn_end}\n", False))
    for i, m in enumerate(messages):
        text = _content(m)
        if m["role"] in ("assistant", "model"):
            out.append((f"{template.turn_start}model\n", False))
            out.append((f"{text}{template.turn_end}", True))
            out.append(("\n", False))
        else:
            if system and not template.system_role and i == 0:
                text = f"{system}\n\n{text}"
            role = "user" if m["role"] != "tool" else "tool"
            out.append((f"{template.turn_start}{role}\n{text}{template.turn_end}\n", False))
    if add_generation_prompt:
        out.append((f"{template.turn_start}model\n", False))
    return out


def render_text(messages, template: Template, add_generation_prompt: bool = True, think: bool = False) -> str:
    return "".join(text for text, _ in segments(messages, template, add_generation_prompt, think))


def render(messages, tokenizer, template: Template | str | None = None, *, add_generation_prompt: bool = True,
           think: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, for each, whether a fine-tune should learn to predict it.
    `template` is a built-in Template or a jinja source string from the checkpoint."""
    if isinstance(template, str):
        text = render_jinja(template, messages, tokenizer, add_generation_prompt)
        ids = tokenizer.encode(text)
        return ids, [False] * len(ids)
    ids: list[int] = []
    mask: list[bool] = []
    for text, trainable in segments(messages, template or GEMMA3, add_generation_prompt, think):
        piece = tokenizer.encode(text)
        ids += piece
        mask += [trainable] * len(piece)
    return ids, mask


def render_jinja(source: str, messages, tokenizer, add_generation_prompt: bool) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise BadOptionError(f"the model's chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else "",
            eos_token=tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else "")
    except jinja2.TemplateError as exc:
        raise BadOptionError(f"the model's chat template failed: {exc}") from None


def stop_ids(tokenizer, template: Template) -> set[int]:
    """Token ids that end the model's turn."""
    ids = {tokenizer.token_to_id(t) for t in template.stop_tokens}
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return {i for i in ids if i is not None}


def template_for(model) -> Template:
    return BUILTIN.get(model.config.model_type, GEMMA3)
