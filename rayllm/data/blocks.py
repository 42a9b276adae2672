"""The curation blocks: read documents, normalise them, filter them, hash them for dedup.

Each block is a small object with its own parameters; a filter answers ``None`` to keep a
document or a short reason to drop it. The pipeline records the reason on the document, so
the stats explain every drop (``<filter>.<reason>``) and the blocks run without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from typing import Literal

import fsspec

from rayllm.config import StageConfig

# --- reading -------------------------------------------------------------------------------


def read_documents(
    url: str, *, split: Literal["file", "paragraph", "line"], text_field: str
) -> Iterator[dict]:
    """Yield ``{"text", "source", "bad_bytes"}`` for each document of one file.

    ``.jsonl`` files hold one document per line in ``text_field``; other files are plain
    text cut into documents by ``split``. Undecodable bytes are replaced and counted, and a
    JSON line that does not parse or lacks the field becomes an empty document that the
    ``empty`` rule drops, so it shows in the stats instead of vanishing.
    """
    with fsspec.open(url, "rb", compression="infer") as handle:
        raw = handle.read()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if url.endswith((".jsonl", ".jsonl.gz", ".json")):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line).get(text_field, "")
            except (json.JSONDecodeError, AttributeError):
                value = ""
            text = value if isinstance(value, str) else ""
            yield {"text": text, "source": f"{url}:{number}", "bad_bytes": 0}
        return
    if split == "file":
        pieces = [text]
    elif split == "line":
        pieces = text.splitlines()
    else:
        pieces = re.split(r"\n\s*\n", text)
    for number, piece in enumerate(pieces):
        if piece.strip():
            yield {"text": piece, "source": f"{url}#{number}", "bad_bytes": bad * (number == 0)}


# --- normalising ---------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """Unicode NFC, no control characters, single spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --- filtering -----------------------------------------------------------------------------


class QualityConfig(StageConfig):
    """Thresholds of the document quality rules (a subset of Gopher's, Rae et al. 2021)."""

    min_words: int = 5
    max_words: int = 100_000
    min_mean_word_length: float = 2.0
    max_mean_word_length: float = 12.0
    min_alpha_fraction: float = 0.6
    max_symbol_word_ratio: float = 0.1


_WORD = re.compile(r"\S+")


class QualityFilter:
    """Gopher quality rules: word count, mean word length, alphabetic share, symbols.

    From "Scaling Language Models: Methods, Analysis & Insights from Training Gopher"
    (Rae et al., 2021), appendix A. Not implemented here yet: bullet / ellipsis lines,
    stop words, and the repetition rules.
    """

    name = "quality"

    def __init__(self, config: QualityConfig):
        self.config = config

    def filter(self, text: str) -> str | None:
        c = self.config
        words = _WORD.findall(text)
        if len(words) < c.min_words:
            return "too_few_words"
        if len(words) > c.max_words:
            return "too_many_words"
        mean_length = sum(len(w) for w in words) / len(words)
        if not c.min_mean_word_length <= mean_length <= c.max_mean_word_length:
            return "mean_word_length"
        alpha = sum(any(ch.isalpha() for ch in w) for w in words) / len(words)
        if alpha < c.min_alpha_fraction:
            return "not_alphabetic"
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / len(words) > c.max_symbol_word_ratio:
            return "symbol_ratio"
        return None


class EmptyFilter:
    """Drops documents with no text left after normalising (blank files, bad JSON lines)."""

    name = "empty"

    def filter(self, text: str) -> str | None:
        return "no_text" if not text else None


def content_hash(text: str) -> str:
    """Hash of the document with case and whitespace folded: equal hashes are exact duplicates."""
    folded = " ".join(text.lower().split())
    return hashlib.blake2b(folded.encode(), digest_size=16).hexdigest()
