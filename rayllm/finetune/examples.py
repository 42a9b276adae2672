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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rayllm.data.corpora import resolve_source
from rayllm.errors import RayllmError
from rayllm.model.config import IGNORED
from rayllm.paths import filesystem

if TYPE_CHECKING:  # transformers is imported where examples are rendered, not where read
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
PAIRS = (("prompt", "response"), ("question", "answer"))
Conversation = list[dict[str, str]]
Example = tuple[list[int], list[bool]]
"""Token ids, and whether each is trained on."""


def read_conversations(source: str) -> list[Conversation]:
    """Every conversation of ``source`` (a file, folder, glob or URL of JSON lines, or the
    built-in ``chat``), checked; the first bad line is an error naming it."""
    conversations = [conversation(row, where) for row, where in json_lines(source)]
    if not conversations:
        raise RayllmError(f"{source} holds no examples")
    return conversations


def json_lines(source: str) -> Iterator[tuple[Any, str]]:
    """Each non-blank line of ``source``'s files parsed as JSON, with its ``file:line``."""
    for url in resolve_source(source):
        fs, path = filesystem(url)
        for number, line in enumerate(fs.cat_file(path).decode().splitlines(), start=1):
            if line.strip():
                try:
                    yield json.loads(line), f"{url}:{number}"
                except json.JSONDecodeError as err:
                    raise RayllmError(f"{url}:{number} is not JSON: {err}") from None


def conversation(row: Any, where: str) -> Conversation:
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
    examples: list[Example],
    seq_len: int,
    pad_id: int,
    *,
    strict: bool = False,
    counts: Counts | None = None,
    virtual: list[int] | None = None,
) -> PackedExamples:
    """Supervised examples, each whole in one row (see :func:`pack_units`)."""
    options = {"strict": strict, "counts": counts, "virtual": virtual}
    return pack_units([[e] for e in examples], seq_len, pad_id, **options)


def pack_units(
    units: list[list[Example]],
    seq_len: int,
    pad_id: int,
    *,
    strict: bool = False,
    counts: Counts | None = None,
    virtual: list[int] | None = None,
) -> PackedExamples:
    """Units of examples in order (one example, or a preference pair: chosen then rejected),
    each unit whole in one row, a row filled until the next unit does not fit; segments are
    numbered from 1 in each row, so pair ``k`` of a row is segments ``2k + 1`` and ``2k + 2``.
    Each example starts with the ``virtual`` tokens of prompt or prefix tuning, if any.
    An example longer than ``seq_len`` is cut to what its unit leaves room for (counted), or
    refused under ``strict``; a unit with an example left with nothing to train on is dropped
    (counted)."""
    counts = counts if counts is not None else Counts()
    rows: list[list[Example]] = [[]]
    used = 0
    for number, unit in enumerate(units):
        counts.examples += 1
        room = seq_len // len(unit)
        kept = []
        for ids, trained in (with_virtual_tokens(example, virtual or []) for example in unit):
            if len(ids) > room:
                if strict:
                    raise RayllmError(
                        f"example {number} has {len(ids)} tokens, more than the {room} its row "
                        f"leaves it (seq_len {seq_len}); raise seq_len, or set strict=false to "
                        "cut long examples"
                    )
                ids, trained = ids[:room], trained[:room]
                counts.truncated += 1
            kept.append((ids, trained))
        if not all(any(trained[1:]) for _, trained in kept):
            counts.dropped += 1
            continue
        size = sum(len(ids) for ids, _ in kept)
        counts.tokens += size
        if used + size > seq_len:
            rows.append([])
            used = 0
        rows[-1].extend(kept)
        used += size
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


def with_virtual_tokens(example: Example, virtual: list[int]) -> Example:
    """``example`` read after the ``virtual`` tokens of prompt or prefix tuning, which are not
    trained on."""
    ids, trained = example
    return virtual + ids, [False] * len(virtual) + trained


Preference = tuple[Conversation, str, str]
"""A conversation before the answer, the chosen answer and the rejected one."""


def read_preferences(source: str, seed: int = 0) -> list[Preference]:
    """Preference pairs: JSON lines in the reward-model format (``prompt`` as text or
    messages, ``chosen`` and ``rejected`` as text or assistant messages, as trl's preference
    datasets have them), or, for ``chat``, pairs built from the built-in chat corpus: each
    question's own answer chosen, another question's answer rejected."""
    if source == "chat":
        return built_preferences(read_conversations("chat"), seed)
    pairs = [preference(row, where) for row, where in json_lines(source)]
    if not pairs:
        raise RayllmError(f"{source} holds no preference pairs")
    return pairs


def preference(row: Any, where: str) -> Preference:
    if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise RayllmError(
            f"{where} is not a preference pair; write "
            '{"prompt": ..., "chosen": ..., "rejected": ...}'
        )
    prompt = row["prompt"]
    prefix = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    answers = []
    for key in ("chosen", "rejected"):
        answer = row[key]
        if isinstance(answer, list):  # conversational: the assistant's message(s)
            answer = answer[-1].get("content") if answer and isinstance(answer[-1], dict) else None
        if not isinstance(answer, str) or not answer.strip():
            raise RayllmError(f"{where}: {key} is empty or not an answer")
        answers.append(answer)
    if answers[0].strip() == answers[1].strip():
        raise RayllmError(f"{where}: chosen and rejected are the same answer; nothing to prefer")
    checked([*prefix, {"role": "assistant", "content": answers[0]}], where)
    return prefix, answers[0], answers[1]


def built_preferences(conversations: list[Conversation], seed: int) -> list[Preference]:
    """Each conversation's own last answer chosen, and the last answer of another, seeded pick
    (one with a different text) rejected."""
    rng = random.Random(seed)
    pairs = []
    for conversation in conversations:
        chosen = conversation[-1]["content"]
        for _ in range(10):
            rejected = rng.choice(conversations)[-1]["content"]
            if rejected.strip() != chosen.strip():
                pairs.append((conversation[:-1], chosen, rejected))
                break
    return pairs


def render_pair(tokenizer: PreTrainedTokenizerBase, pair: Preference) -> list[Example]:
    prefix, chosen, rejected = pair
    return [
        render(tokenizer, [*prefix, {"role": "assistant", "content": answer}])
        for answer in (chosen, rejected)
    ]
