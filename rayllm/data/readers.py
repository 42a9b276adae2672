"""Reading documents out of files: plain text, JSON lines and Parquet, on any fsspec URL."""

from __future__ import annotations

import json
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
    marked ``bad_record``, so it is counted in the stats instead of vanishing. JSON lines and
    text split by line or paragraph are read line by line, so a large file costs no more
    memory than its largest document.
    """
    if url.endswith(".parquet"):
        with fsspec.open(url, "rb") as handle:
            table = pq.read_table(handle)
        if text_field not in table.column_names:
            yield _record("", 0, url, bad=f"no column {text_field!r}")
            return
        for number, value in enumerate(table.column(text_field).to_pylist()):
            text = value if isinstance(value, str) else ""
            yield _record(
                text, 0, f"{url}#{number}", bad="" if isinstance(value, str) else "not text"
            )
        return
    with fsspec.open(url, "rb", compression="infer") as handle:
        if split == "file" and not url.endswith(JSON_LINES):
            yield _record(*_decode(handle.read()), f"{url}#0")
            return
        yield from _stream(handle, url, split, text_field)


JSON_LINES = (".jsonl", ".jsonl.gz", ".json")


def _decode(raw: bytes) -> tuple[str, int]:
    """Text with undecodable bytes replaced, and how many replacements were made."""
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _stream(handle, url: str, split: Split, text_field: str) -> Iterator[dict]:
    """Documents of a file read line by line: memory holds one document, not the file."""
    paragraph: list[str] = []
    paragraph_bad = count = 0
    for number, raw in enumerate(handle, start=1):
        line, bad = _decode(raw.rstrip(b"\r\n"))
        if url.endswith(JSON_LINES):
            if line.strip():
                yield _json_record(line, f"{url}:{number}", text_field, bad)
        elif split == "line":
            if line.strip():
                yield _record(line, bad, f"{url}:{number}")
        elif line.strip():
            paragraph.append(line)
            paragraph_bad += bad
        elif paragraph:
            yield _record("\n".join(paragraph), paragraph_bad, f"{url}#{count}")
            paragraph, paragraph_bad, count = [], 0, count + 1
    if paragraph:
        yield _record("\n".join(paragraph), paragraph_bad, f"{url}#{count}")


def _json_record(line: str, source: str, text_field: str, bad_bytes: int) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return _record("", bad_bytes, source, bad="invalid JSON")
    value = value.get(text_field) if isinstance(value, dict) else None
    if not isinstance(value, str):
        return _record("", bad_bytes, source, bad=f"no {text_field!r}")
    return _record(value, bad_bytes, source)


def _record(text: str, bad_bytes: int, source: str, bad: str = "") -> dict:
    return {"text": text, "source": source, "bad_bytes": bad_bytes, "bad_record": bad}
