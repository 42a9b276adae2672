"""What every curation block is: a name, its config, the columns it adds, and
``apply(doc) -> None | reason``.

A block may rewrite ``doc["text"]`` (normalising, scrubbing) or add fields (language and its
score, PII counts, a quality score); a filter answers a short reason to drop. The pipeline
records ``<block>.<reason>`` on the document and every column a block declares, so the curated
Parquet and the stats carry them without the pipeline knowing any block by name; blocks are
testable without a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Document = dict[str, Any]

WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Column:
    """A field a block adds to each document, and how the stats summarise it."""

    default: Any
    """The value of a document the block never saw (dropped earlier)."""
    summary: Literal["sum", "top", "distribution"]
    """sum: a total (counts); top: the most frequent values; distribution: mean and quantiles."""


class Block:
    name: ClassVar[str]
    columns: ClassVar[dict[str, Column]] = {}

    def apply(self, doc: Document) -> str | None:
        """Return None to keep the document (possibly changed), or why it is dropped."""
        raise NotImplementedError


class TextFilter(Block):
    """A block that only reads the text: subclasses implement ``filter(text)``."""

    def apply(self, doc: Document) -> str | None:
        return self.filter(doc["text"])

    def filter(self, text: str) -> str | None:
        raise NotImplementedError
