"""Language identification with lingua (models bundled in the wheel, no downloads)."""

from __future__ import annotations

from rayllm.config import StageConfig
from rayllm.data.blocks.base import Block, Column, Document


class LanguageConfig(StageConfig):
    enabled: bool = True
    keep: list[str] = ["en"]
    """ISO 639-1 codes to keep; empty keeps every language (and still records it)."""
    min_score: float = 0.0
    """Drop documents whose top language has a lower confidence than this (0 to 1)."""
    sample_chars: int = 2000
    """Identify on the first N characters: long documents cost no more than this."""


class LanguageId(Block):
    """Records ``language`` and ``language_score``; drops languages not in ``keep``."""

    name = "language"
    columns = {"language": Column("", "top"), "language_score": Column(None, "distribution")}

    def __init__(self, config: LanguageConfig):
        from lingua import LanguageDetectorBuilder

        self.c = config
        self.keep = {code.lower() for code in config.keep}
        self.detector = LanguageDetectorBuilder.from_all_languages().build()

    def apply(self, doc: Document) -> str | None:
        values = self.detector.compute_language_confidence_values(
            doc["text"][: self.c.sample_chars]
        )
        if not values:
            doc["language"], doc["language_score"] = "unknown", 0.0
            return "unknown" if self.keep else None
        top = values[0]
        doc["language"] = top.language.iso_code_639_1.name.lower()
        doc["language_score"] = float(top.value)
        if self.keep and doc["language"] not in self.keep:
            return f"not_{'_'.join(sorted(self.keep))}"
        if top.value < self.c.min_score:
            return "low_score"
        return None
