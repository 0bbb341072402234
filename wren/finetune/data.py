"""Training data: JSONL lines -> token ids + loss masks -> padded (or packed) batches.

A line is one of
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   a chat
    {"prompt": "...", "completion": "..."}                                         one user turn, one reply
    {"text": "..."}                                                                plain text, all learned
Chats go through `wren.chat.render`, the very function inference renders prompts with, so a fine-tune
sees exactly the tokens the served model will; by default only the assistant's replies are learned.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import GEMMA3, Template, render, render_jinja, render_text, template_for
from ..errors import BadOptionError, ModelNotFoundError, WrenError


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[i]: token i is a target (predicted from the tokens before it)


def to_messages(record, where: str) -> list[dict] | None:
    """A JSONL record as chat messages, or None for a plain-text record."""
    if not isinstance(record, dict):
        raise BadOptionError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadOptionError(f"{where}: 'messages' must be a non-empty list")
        if not any(isinstance(m, dict) and m.get("role") in ("assistant", "model") for m in messages):
            raise BadOptionError(f"{where}: the chat has no assistant turn to learn from")
        return messages
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise BadOptionError(f"{where}: 'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if "text" in record:
        if not isinstance(record["text"], str):
            raise BadOptionError(f"{where}: 'text' must be a string")
        return None
    raise BadOptionError(f"{where}: a line needs 'messages', 'prompt' + 'completion', or 'text'; "
                         f"it has {sorted(record)}")


def training_template(model) -> Template | str:
    """The template inference renders this model's prompts with: its own jinja one, else the built-in."""
    return model.chat_template or template_for(model)


def render_training(messages: list[dict], tokenizer, template: Template | str, builtin: Template):
    """(ids, mask) of a whole chat. A built-in template goes straight through `chat.render`. A checkpoint's
    jinja template is rendered as inference renders it; where its text is the built-in's (Gemma's own
    templates), `chat.render` gives the mask; otherwise each reply is found as the text a prefix of the chat
    with a generation prompt leaves off."""
    if not isinstance(template, str):
        return render(messages, tokenizer, template, add_generation_prompt=False)
    full = render_jinja(template, messages, tokenizer, False)
    if full == render_text(messages, builtin, add_generation_prompt=False):
        return render(messages, tokenizer, builtin, add_generation_prompt=False)
    pieces, at = [], 0
    for i, m in enumerate(messages):
        if m.get("role") not in ("assistant", "model"):
            continue
        before = render_jinja(template, messages[:i], tokenizer, True)
        upto = render_jinja(template, messages[:i + 1], tokenizer, False).rstrip()
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= at):
            return render(messages, tokenizer, builtin, add_generation_prompt=False)  # not prefix-stable
        pieces += [(full[at:len(before)], False), (full[len(before):len(upto)], True)]
        at = len(upto)
    pieces.append((full[at:], False))
    ids: list[int] = []
    mask: list[bool] = []
    for text, trainable in pieces:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        mask += [trainable] * len(piece)
    return ids, mask


def encode(record, tokenizer, template: Template | str, where: str, train_on_prompt: bool = False,
           builtin: Template | None = None) -> Example:
    """One record -> ids and the mask of tokens to learn (assistant turns; all of a plain text)."""
    messages = to_messages(record, where)
    if messages is None:
        ids = tokenizer.encode(record["text"])
        if tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
        if tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        return Example(ids, [False] + [True] * (len(ids) - 1))
    try:
        ids, mask = render_training(messages, tokenizer, template,
                                     builtin or (template if isinstance(template, Template) else GEMMA3))
    except WrenError as exc:
        raise BadOptionError(f"{where}: {exc}") from None
    if train_on_prompt:
        mask = [False] + [True] * (len(ids) - 1)
    return Example(ids, mask)


@dataclass
class Dataset:
    examples: list[Example]
    skipped: int = 0  # bad lines skipped with --skip-bad
    truncated: int = 0  # examples cut to max_len

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)


def load_jsonl(path, tokenizer, model, max_len: int, skip_bad: bool = False,
               train_on_prompt: bool = False) -> Dataset:
    """Read and encode a JSONL file with the model's chat template. A bad line raises an error naming it,
    or is counted and skipped."""
    template, builtin = training_template(model), template_for(model)
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no data file at {path}")
    data = Dataset([])
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError) as exc:
                    raise BadOptionError(f"{where}: not valid JSON ({exc})") from None
                ex = encode(record, tokenizer, template, where, train_on_prompt, builtin)
                if not any(ex.mask[1:]):
                    raise BadOptionError(f"{where}: nothing to learn (no assistant tokens)")
            except BadOptionError as exc:
                if not skip_bad:
                    raise BadOptionError(f"{exc} (or pass --skip-bad to skip bad lines)") from None
                data.skipped += 1
                continue
            if len(ex.ids) > max_len:
                ex = Example(ex.ids[:max_len], ex.mask[:max_len])
                data.truncated += 1
                if not any(ex.mask[1:]):
                    data.skipped += 1  # everything learnable was cut off
                    continue
            data.examples.append(ex)
    if not data.examples:
        raise BadOptionError(f"{path} holds no usable training example")
    return data


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Greedily put whole examples together into rows of at most max_len tokens (first fit, in order).
    Later examples in a row attend to earlier ones, as in TRL's packing; the loss masks stay their own."""
    rows: list[Example] = []
    for ex in examples:
        for row in rows:
            if len(row.ids) + len(ex.ids) <= max_len:
                row.ids += ex.ids
                row.mask += ex.mask
                break
        else:
            rows.append(Example(list(ex.ids), list(ex.mask)))
    return rows


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of n items in one epoch: a function of (seed, epoch) only, so a resumed run
    replays exactly the batches an uninterrupted one would see."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, T], targets [B, T], target mask [B, T]): position t predicts token t+1. Rows are
    right-padded; with causal attention padding after a row's end changes nothing before it."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.mask)] = torch.tensor(e.mask)
    targets = torch.roll(ids, -1, dims=1)
    target_mask = torch.roll(mask, -1, dims=1)
    target_mask[:, -1] = False
    return ids, targets, target_mask


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    order = epoch_order(len(examples), seed, epoch)
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def check_file(path) -> None:
    if path is not None and not os.path.isfile(path):
        raise ModelNotFoundError(f"no data file at {path}")
