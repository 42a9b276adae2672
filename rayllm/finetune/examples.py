"""Chat examples for supervised fine-tuning: read from JSON lines and checked, rendered with
the model's chat template with every assistant token marked as trained on, and packed into
rows of whole examples.

A line holds ``messages`` (Hugging Face's chat format: a list of ``{"role", "content"}``), or
one exchange as ``prompt`` and ``response``; ``question`` and ``answer``, as the built-in
``chat`` corpus has them, are read the same way.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from rayllm.data.corpora import resolve_source
from rayllm.errors import RayllmError
from rayllm.model.model import IGNORED
from rayllm.paths import filesystem

ROLES = ("system", "user", "assistant")
PAIRS = (("prompt", "response"), ("question", "answer"))
Conversation = list[dict[str, str]]


def read_conversations(source: str) -> list[Conversation]:
    """Every conversation of ``source`` (a file, folder, glob or URL of JSON lines, or the
    built-in ``chat``), checked; the first bad line is an error naming it."""
    conversations = []
    for url in resolve_source(source):
        fs, path = filesystem(url)
        for number, line in enumerate(fs.cat_file(path).decode().splitlines(), start=1):
            if line.strip():
                conversations.append(conversation(line, f"{url}:{number}"))
    if not conversations:
        raise RayllmError(f"{source} holds no examples")
    return conversations


def conversation(line: str, where: str) -> Conversation:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise RayllmError(f"{where} is not JSON: {err}") from None
    if not isinstance(row, dict):
        raise RayllmError(f"{where} is not a JSON object")
    if "messages" in row:
        messages = row["messages"]
    else:
        pair = next((p for p in PAIRS if p[0] in row and p[1] in row), None)
        if pair is None:
            raise RayllmError(
                f"{where} has neither messages nor a prompt and a response; write "
                '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]} '
                'or {"prompt": ..., "response": ...}'
            )
        messages = [
            {"role": "user", "content": row[pair[0]]},
            {"role": "assistant", "content": row[pair[1]]},
        ]
    return checked(messages, where)


def checked(messages: object, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise RayllmError(f"{where}: messages must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise RayllmError(
                f"{where}: message {index} has "
                + (f"the role {role!r}" if role else "no role")
                + f"; each message needs a role ({', '.join(ROLES)}) and a content"
            )
        if not isinstance(message.get("content"), str):
            raise RayllmError(f"{where}: message {index} has no text content")
        if message["role"] == "assistant" and not message["content"].strip():
            raise RayllmError(f"{where}: message {index} is an empty assistant response")
    if not any(m["role"] == "assistant" for m in messages):
        raise RayllmError(f"{where} has no assistant message: nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def held_out_split(count: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the held-out and the training conversations: a seeded shuffle, its first
    ``share`` held out (at least one). ``rayllm finetune`` and ``rayllm eval`` split the same
    data the same way, so evaluation asks only questions training never saw."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = max(1, round(share * count))
    if held >= count:
        raise RayllmError(f"{count} examples are too few to hold {share:.0%} of them out")
    return order[:held], order[held:]


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation
) -> tuple[list[int], list[bool]]:
    """The conversation's token ids as the chat template renders it, and for each whether it
    is trained on: the assistant turns, each found as what the template adds after the
    generation prompt that opens it. Pieces are tokenized apart, as at inference, where the
    prompt is tokenized alone and the answer generated after it."""
    ids: list[int] = []
    trained: list[bool] = []
    rendered = ""

    def add(text: str, train: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise RayllmError(
                "the chat template does not render a conversation as the start of a longer "
                "one, so the assistant's tokens cannot be told apart; use a template that does"
            )
        piece = tokenizer(text[len(rendered) :], add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        trained.extend([train] * len(piece))
        rendered = text

    def template(turns: Conversation, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )

    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            add(template(messages[:index], generation_prompt=True), False)
            add(template(messages[: index + 1]), True)
    add(template(messages), False)
    return ids, trained


@dataclass
class PackedExamples:
    """Rows of whole examples, all ``[rows, seq_len]``: the token ids, the next-token targets
    (:data:`IGNORED` where not trained on: prompts, padding, across examples) and each token's
    example within its row (0 for padding)."""

    inputs: np.ndarray
    targets: np.ndarray
    segments: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"inputs": self.inputs, "targets": self.targets, "segments": self.segments}

    @property
    def trained_tokens(self) -> int:
        return int((self.targets != IGNORED).sum())


@dataclass
class Counts:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    """Examples left with no trained token once truncated."""
    tokens: int = 0


def pack(
    examples: list[tuple[list[int], list[bool]]],
    seq_len: int,
    pad_id: int,
    *,
    strict: bool = False,
    counts: Counts | None = None,
) -> PackedExamples:
    """Examples in order, each whole in one row, a row filled until the next does not fit.
    An example longer than ``seq_len`` is cut to it (counted), or refused under ``strict``."""
    counts = counts if counts is not None else Counts()
    rows: list[list[tuple[list[int], list[bool]]]] = [[]]
    used = 0
    for number, (ids, trained) in enumerate(examples):
        counts.examples += 1
        if len(ids) > seq_len:
            if strict:
                raise RayllmError(
                    f"example {number} has {len(ids)} tokens, more than seq_len {seq_len}; "
                    "raise seq_len, or set strict=false to cut long examples"
                )
            ids, trained = ids[:seq_len], trained[:seq_len]
            counts.truncated += 1
        if not any(trained[1:]):
            counts.dropped += 1
            continue
        counts.tokens += len(ids)
        if used + len(ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, trained))
        used += len(ids)
    rows = [row for row in rows if row]
    if not rows:
        raise RayllmError("no example has a response token left to train on")
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
    targets = np.full((len(rows), seq_len), IGNORED, dtype=np.int32)
    segments = np.zeros((len(rows), seq_len), dtype=np.int32)
    for r, row in enumerate(rows):
        start = 0
        for s, (ids, trained) in enumerate(row, start=1):
            end = start + len(ids)
            inputs[r, start:end] = ids
            segments[r, start:end] = s
            # position p predicts token p + 1 of the same example, when that one is trained on
            nexts = np.array(ids[1:], dtype=np.int32)
            targets[r, start : end - 1] = np.where(trained[1:], nexts, IGNORED)
            start = end
    return PackedExamples(inputs, targets, segments)
