"""Pack tokenised documents into fixed-length sequences and write them as .npy shards."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import fsspec
import numpy as np


class ShardWriter:
    """Concatenates documents (each ending in end-of-text) and cuts rows of seq_len + 1 tokens.

    Consecutive rows overlap by one token, so every token is a training target exactly once
    and nothing is lost at row or shard boundaries; only the final partial row is dropped.
    Each shard is a ``[rows, seq_len + 1]`` array of uint16 (or uint32 for large vocabularies).
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        folder: str,
        split: str,
        seq_len: int,
        rows_per_shard: int,
        vocab_size: int,
    ):
        self.fs, self.folder, self.split = fs, folder, split
        self.row = seq_len + 1
        self.rows_per_shard = rows_per_shard
        self.dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.uint32
        self.buffer = np.empty(0, dtype=self.dtype)
        self.rows: list[np.ndarray] = []
        self.files: list[dict[str, Any]] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, np.asarray(tokens, dtype=self.dtype)])
        self.tokens += len(tokens)
        step = self.row - 1
        n = (len(self.buffer) - 1) // step
        if n > 0:
            starts = np.arange(n) * step
            self.rows.extend(self.buffer[s : s + self.row] for s in starts)
            self.buffer = self.buffer[n * step :]
        while len(self.rows) >= self.rows_per_shard:
            self._flush(self.rows[: self.rows_per_shard])
            self.rows = self.rows[self.rows_per_shard :]

    def close(self) -> dict[str, Any]:
        if self.rows:
            self._flush(self.rows)
            self.rows = []
        sequences = sum(f["sequences"] for f in self.files)
        return {"files": self.files, "tokens": self.tokens, "sequences": sequences}

    def _flush(self, rows: list[np.ndarray]) -> None:
        array = np.stack(rows)
        payload = io.BytesIO()
        np.save(payload, array, allow_pickle=False)
        data = payload.getvalue()
        name = f"{self.split}-{len(self.files):05d}.npy"
        with self.fs.open(f"{self.folder}/{name}", "wb") as out:
            out.write(data)
        self.files.append(
            {
                "path": name,
                "sequences": len(rows),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
