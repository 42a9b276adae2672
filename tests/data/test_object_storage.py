"""A shard set on an S3 API (moto's server), through the same s3:// URLs a user gives for AWS:
curated on Ray Data into the bucket, published by staging + rename, read back verified."""

import json
import uuid

import numpy as np
import pytest

from rayllm.config import build_config
from rayllm.data.config import DataConfig
from rayllm.data.pipeline import run
from rayllm.data.shards import load_manifest, read_shard, shard_dataset
from rayllm.errors import RayllmError
from tests.data.test_pipeline import corpus_lines

pytestmark = pytest.mark.slow


def test_a_shard_set_in_a_bucket(ray_cluster, s3, tmp_path):
    import fsspec

    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(corpus_lines()))
    output = f"s3://{s3['bucket']}/shards-{uuid.uuid4().hex[:8]}"
    config = build_config(
        DataConfig,
        {
            "corpus": str(source),
            "output": output,
            "tokenizer": {"vocab_size": 400},
            "seq_len": 32,
            "val_fraction": 0.3,
            "gopher_repetition": {"enabled": False},
        },
    )
    result = run(config, report=False)
    assert result.output == output
    fs = fsspec.filesystem("s3")
    assert json.loads(fs.cat_file(f"{output}/manifest.json")) == result.manifest
    assert not [p for p in fs.ls(s3["bucket"]) if ".staging-" in p]

    manifest = load_manifest(output)
    rows = np.concatenate([read_shard(output, f) for f in manifest["shards"]["train"]])
    through_ray_data = np.stack([r["data"] for r in shard_dataset(output).take_all()])
    assert sorted(map(tuple, through_ray_data)) == sorted(map(tuple, rows))

    damaged = manifest["shards"]["train"][0]
    fs.pipe_file(f"{output}/{damaged['path']}", b"damaged")
    with pytest.raises(RayllmError, match="does not match the sha256"):
        read_shard(output, damaged)
