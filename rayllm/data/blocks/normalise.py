"""Text normalisation: unicode NFC, no control characters, tidy whitespace, boilerplate stripped."""

from __future__ import annotations

import re
import unicodedata

from rayllm.config import StageConfig
from rayllm.data.blocks.base import Block, Document

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class NormaliseConfig(StageConfig):
    boilerplate: list[str] = []
    """Regular expressions of lines to strip (matched against each whole line, case-insensitive)."""


def normalise(text: str) -> str:
    """Unicode NFC, no control characters, single spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


class Normaliser(Block):
    name = "normalise"

    def __init__(self, config: NormaliseConfig):
        self.boilerplate = [re.compile(p, re.IGNORECASE) for p in config.boilerplate]

    def apply(self, doc: Document) -> str | None:
        text = normalise(doc["text"])
        if self.boilerplate:
            lines = text.split("\n")
            text = "\n".join(
                line for line in lines if not any(p.fullmatch(line) for p in self.boilerplate)
            )
            text = _BLANK_LINES.sub("\n\n", text).strip()
        doc["text"] = text
        return "empty" if not text else None
