"""Reading documents out of files: plain text, JSON lines and Parquet, on any fsspec URL."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Literal

import fsspec
import pyarrow.parquet as pq

Split = Literal["file", "paragraph", "line"]


def read_documents(url: str, *, split: Split, text_field: str) -> Iterator[dict]:
    """Yield ``{"text", "source", "bad_bytes", "bad_record"}`` for each document of one file.

    ``.jsonl`` and ``.parquet`` files hold one document per record in ``text_field``; other
    files are plain text cut into documents by ``split``. Undecodable bytes are replaced and
    counted; a JSON line that does not parse or lacks the field becomes an empty document
    marked ``bad_record``, so it is counted in the stats instead of vanishing.
    """
    if url.endswith(".parquet"):
        with fsspec.open(url, "rb") as handle:
            table = pq.read_table(handle)
        if text_field not in table.column_names:
            yield _record("", f"{url}", bad=f"no column {text_field!r}")
            return
        for number, value in enumerate(table.column(text_field).to_pylist()):
            yield _record(
                value if isinstance(value, str) else "",
                f"{url}#{number}",
                bad="" if isinstance(value, str) else "not text",
            )
        return
    with fsspec.open(url, "rb", compression="infer") as handle:
        raw = handle.read()
    text = raw.decode("utf-8", errors="replace")
    bad_bytes = text.count("\ufffd") - raw.count("\ufffd".encode())
    if url.endswith((".jsonl", ".jsonl.gz", ".json")):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                yield _record("", f"{url}:{number}", bad="invalid JSON")
                continue
            value = value.get(text_field) if isinstance(value, dict) else None
            yield _record(
                value or "",
                f"{url}:{number}",
                bad="" if isinstance(value, str) else f"no {text_field!r}",
            )
        return
    if split == "file":
        pieces = [text]
    elif split == "line":
        pieces = text.splitlines()
    else:
        pieces = re.split(r"\n\s*\n", text)
    first = True
    for number, piece in enumerate(pieces):
        if piece.strip():
            yield _record(piece, f"{url}#{number}", bad_bytes=bad_bytes if first else 0)
            first = False


def _record(text: str, source: str, bad: str = "", bad_bytes: int = 0) -> dict:
    return {"text": text, "source": source, "bad_bytes": bad_bytes, "bad_record": bad}
