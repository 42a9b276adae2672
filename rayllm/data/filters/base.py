"""What every curation block is: a name, ``apply(doc) -> None | reason``, nothing else.

A block may rewrite ``doc["text"]`` (normalising, scrubbing) or add fields (language, PII
counts); a filter answers a short reason to drop. The pipeline records ``<block>.<reason>`` on
the document, so the stats explain every drop, and blocks are testable without a cluster.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

Document = dict[str, Any]

WORD = re.compile(r"\S+")


class Block(Protocol):
    name: str

    def apply(self, doc: Document) -> str | None:
        """Return None to keep the document (possibly changed), or why it is dropped."""
        ...


class TextFilter:
    """A block that only reads the text: subclasses implement ``filter(text)``."""

    name = "filter"

    def apply(self, doc: Document) -> str | None:
        return self.filter(doc["text"])

    def filter(self, text: str) -> str | None:
        raise NotImplementedError
