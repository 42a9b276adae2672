"""The C4 rules and a bad-word list.

From "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
(Raffel et al., 2020), section 2.2, following datatrove's ``C4QualityFilter``. The line-level
rules (terminal punctuation, minimum words, javascript, policy lines) drop lines rather than
documents; a document left with too few sentences is dropped. Not implemented: the "citation
marker" removal of Wikipedia-style ``[1]`` references.
"""

from __future__ import annotations

import re

from rayllm.config import StageConfig
from rayllm.data.blocks.base import WORD, Block, Document

END_PUNCTUATION = (".", "?", "!", '"', "'", "”", "’")
POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


class C4Config(StageConfig):
    enabled: bool = True
    line_min_words: int = 3
    require_terminal_punctuation: bool = True
    min_sentences: int = 3
    drop_lorem_ipsum: bool = True
    drop_curly_braces: bool = True
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True


class C4(Block):
    """Keeps lines that end in terminal punctuation and hold enough words; drops code and filler."""

    name = "c4"

    def __init__(self, config: C4Config):
        self.c = config

    def apply(self, doc: Document) -> str | None:
        c = self.c
        text = doc["text"]
        lowered = text.lower()
        if c.drop_lorem_ipsum and "lorem ipsum" in lowered:
            return "lorem_ipsum"
        if c.drop_curly_braces and ("{" in text or "}" in text):
            return "curly_braces"
        kept = []
        for line in text.split("\n"):
            stripped = line.strip()
            if not stripped:
                kept.append(line)
                continue
            low = stripped.lower()
            if c.require_terminal_punctuation and not stripped.endswith(END_PUNCTUATION):
                continue
            if len(WORD.findall(stripped)) < c.line_min_words:
                continue
            if c.drop_javascript_lines and "javascript" in low:
                continue
            if c.drop_policy_lines and any(p in low for p in POLICY):
                continue
            kept.append(line)
        text = "\n".join(kept).strip()
        if len(re.findall(r"[.!?]+(?:\s|$)", text)) < c.min_sentences:
            return "too_few_sentences"
        doc["text"] = text
        return None


class BadWordsConfig(StageConfig):
    enabled: bool = True
    words: list[str] = []
    """Words or phrases (case-insensitive, whole words) whose presence drops a document."""
    max_hits: int = 0


class BadWords(Block):
    name = "bad_words"

    def __init__(self, config: BadWordsConfig):
        self.max_hits = config.max_hits
        words = sorted({w.lower() for w in config.words if w.strip()}, key=len, reverse=True)
        self.pattern = (
            re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b") if words else None
        )

    def apply(self, doc: Document) -> str | None:
        if self.pattern is None:
            return None
        hits = len(self.pattern.findall(doc["text"].lower()))
        return "bad_words" if hits > self.max_hits else None
