"""The Gopher quality and repetition rules.

From "Scaling Language Models: Methods, Analysis & Insights from Training Gopher" (Rae et al.,
2021), appendix A, with the thresholds of the paper; the reference implementation followed is
datatrove's ``GopherQualityFilter`` / ``GopherRepetitionFilter``. All rules of the paper's
appendix are implemented; words are whitespace-separated tokens.
"""

from __future__ import annotations

import re
from collections import Counter

from rayllm.config import StageConfig
from rayllm.data.blocks.base import WORD, TextFilter

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "▪", "-", "*", "–", "—")


class GopherQualityConfig(StageConfig):
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_hash_word_ratio: float = 0.1
    """'#' symbols per word (Gopher's symbol-to-word rule, one of two)."""
    max_ellipsis_word_ratio: float = 0.1
    """Ellipses ('...' or '…') per word (the other symbol-to-word rule)."""
    max_bullet_lines_fraction: float = 0.9
    max_ellipsis_lines_fraction: float = 0.3
    min_alpha_words_fraction: float = 0.8
    min_stop_words: int = 2


class GopherQuality(TextFilter):
    """Word count, mean word length, symbols, bullet and ellipsis lines, alphabetic words, stop words."""

    name = "gopher_quality"

    def __init__(self, config: GopherQualityConfig):
        self.c = config

    def filter(self, text: str) -> str | None:
        c = self.c
        words = WORD.findall(text)
        if len(words) < c.min_words:
            return "too_few_words"
        if len(words) > c.max_words:
            return "too_many_words"
        mean_length = sum(map(len, words)) / len(words)
        if not c.min_mean_word_length <= mean_length <= c.max_mean_word_length:
            return "mean_word_length"
        if text.count("#") / len(words) > c.max_hash_word_ratio:
            return "hash_word_ratio"
        if (text.count("...") + text.count("…")) / len(words) > c.max_ellipsis_word_ratio:
            return "ellipsis_word_ratio"
        lines = [line for line in text.splitlines() if line.strip()] or [""]
        if (
            sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines)
            > c.max_bullet_lines_fraction
        ):
            return "bullet_lines"
        ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines)
        if ellipsis / len(lines) > c.max_ellipsis_lines_fraction:
            return "ellipsis_lines"
        if (
            sum(any(ch.isalpha() for ch in w) for w in words) / len(words)
            < c.min_alpha_words_fraction
        ):
            return "alpha_words"
        if sum(w.lower().strip(".,;:!?'\"") in STOP_WORDS for w in words) < c.min_stop_words:
            return "stop_words"
        return None


class GopherRepetitionConfig(StageConfig):
    enabled: bool = True
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_paragraph_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    max_duplicate_paragraph_char_fraction: float = 0.2
    top_ngram_max_char_fraction: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    duplicated_ngram_max_char_fraction: dict[int, float] = {
        5: 0.15,
        6: 0.14,
        7: 0.13,
        8: 0.12,
        9: 0.11,
        10: 0.10,
    }


def _duplicates(items: list[str]) -> tuple[int, int]:
    """How many items repeat an earlier one, and how many characters those repeats hold."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        seen.add(item)
    return count, chars


def _top_ngram_fraction(words: list[str], n: int) -> float:
    ngrams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not ngrams:
        return 0.0
    gram, count = Counter(ngrams).most_common(1)[0]
    return len(gram) * count / max(1, sum(map(len, words)))


def _duplicated_ngram_fraction(words: list[str], n: int) -> float:
    """Share of characters inside n-grams that occur more than once (overlaps counted once)."""
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            covered[i : i + n] = [True] * n
        seen.add(gram)
    total = sum(map(len, words))
    return sum(len(w) for w, hit in zip(words, covered, strict=True) if hit) / max(1, total)


class GopherRepetition(TextFilter):
    """Duplicate lines / paragraphs (by count and by characters), top and duplicated n-grams."""

    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig):
        self.c = config

    def filter(self, text: str) -> str | None:
        c = self.c
        paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p]
        count, chars = _duplicates(paragraphs)
        if paragraphs and count / len(paragraphs) > c.max_duplicate_paragraph_fraction:
            return "duplicate_paragraphs"
        if chars / max(1, len(text)) > c.max_duplicate_paragraph_char_fraction:
            return "duplicate_paragraph_chars"
        lines = [line for line in text.split("\n") if line.strip()]
        count, chars = _duplicates(lines)
        if lines and count / len(lines) > c.max_duplicate_line_fraction:
            return "duplicate_lines"
        if chars / max(1, len(text)) > c.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"
        words = WORD.findall(text)
        for n, limit in c.top_ngram_max_char_fraction.items():
            if _top_ngram_fraction(words, n) > limit:
                return f"top_{n}_gram"
        for n, limit in c.duplicated_ngram_max_char_fraction.items():
            if _duplicated_ngram_fraction(words, n) > limit:
                return f"duplicated_{n}_gram"
        return None
