"""Packing keeps every token and shards round-trip."""

import fsspec
import numpy as np

from rayllm.data.packing import ShardWriter
from rayllm.data.shards import read_shard


def test_every_token_is_a_target_once(tmp_path):
    fs = fsspec.filesystem("file")
    writer = ShardWriter(fs, str(tmp_path), "train", seq_len=8, rows_per_shard=3, vocab_size=1000)
    stream = np.arange(1, 101)
    for doc in np.split(stream, [5, 17, 18, 60]):
        writer.add(doc)
    summary = writer.close()
    rows = np.concatenate([read_shard(str(tmp_path), f) for f in summary["files"]])
    assert rows.shape[1] == 9 and rows.dtype == np.uint16
    targets = rows[:, 1:].ravel()
    np.testing.assert_array_equal(targets, stream[1 : 1 + len(targets)])
    assert len(targets) == (len(stream) - 1) // 8 * 8
    assert [f["sequences"] for f in summary["files"]] == [3, 3, 3, 3]
    assert summary["tokens"] == 100
