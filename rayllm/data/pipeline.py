"""The curation pipeline on Ray Data: documents in, a tokenizer and packed token shards out.

    read -> normalise -> filter -> exact dedup -> train tokenizer -> tokenise -> pack -> publish

Reading, normalising, filtering and tokenising run as Ray Data tasks across the cluster; the
dedup is a hash shuffle (``groupby``). Packing streams the tokenised documents through the
driver, in order, so no token is lost between shards. Everything is written to a staging
folder and moved into place with the manifest last: a shard set without a manifest is
incomplete and training refuses it.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections import Counter
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import ray
from tokenizers import Tokenizer

from rayllm.config import StageConfig
from rayllm.data.blocks import (
    EmptyFilter,
    QualityConfig,
    QualityFilter,
    content_hash,
    normalise,
    read_documents,
)
from rayllm.data.corpora import resolve_source
from rayllm.data.packing import ShardWriter
from rayllm.data.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer
from rayllm.errors import RayllmError
from rayllm.progress import Stage


class DataConfig(StageConfig):
    """Every knob of the curation stage."""

    corpus: str = "shakespeare"
    """A built-in corpus name, or a file, folder, glob or fsspec URL of .txt / .jsonl files."""
    split: Literal["file", "paragraph", "line"] = "paragraph"
    text_field: str = "text"
    max_documents: int | None = None
    """Keep only the first N documents read (a quick slice for trials and tests)."""
    output: str = "rayllm-work/data"
    quality: QualityConfig = QualityConfig()
    exact_dedup: bool = True
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = 256
    """Tokens per training sequence; shards store seq_len + 1 tokens per row (inputs+target)."""
    val_fraction: float = 0.02
    sequences_per_shard: int = 8192


def _read(row: dict[str, Any], split: str, text_field: str) -> list[dict[str, Any]]:
    return list(read_documents(row["path"], split=split, text_field=text_field))


def _curate(batch: pa.Table, quality: QualityConfig) -> pa.Table:
    """Normalise each document and record why it is dropped ("" when kept)."""
    filters = [EmptyFilter(), QualityFilter(quality)]
    texts, reasons, hashes = [], [], []
    for raw in batch.column("text").to_pylist():
        text = normalise(raw)
        reason = next((f"{f.name}.{r}" for f in filters if (r := f.filter(text)) is not None), "")
        texts.append(text)
        reasons.append(reason)
        hashes.append(content_hash(text))
    return (
        batch.drop_columns(["text"])
        .append_column("text", pa.array(texts, pa.string()))
        .append_column("drop", pa.array(reasons, pa.string()))
        .append_column("hash", pa.array(hashes, pa.string()))
    )


def _first_of_group(group: pa.Table) -> pa.Table:
    """Keep one document of a group of exact duplicates: the first in source order."""
    order = np.argsort(np.array(group.column("source").to_pylist(), dtype=object), kind="stable")
    return group.take([int(order[0])])


class _Tokenise:
    """Ray Data UDF: token ids of each document, end-of-text appended, and its split.

    Documents go to the validation split by their content hash, so a document and its
    exact duplicates never straddle the two splits.
    """

    def __init__(self, tokenizer_json: str, eos_token_id: int, val_fraction: float):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos = eos_token_id
        self.val_cutoff = int(val_fraction * 10_000)

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoded = self.tokenizer.encode_batch(batch.column("text").to_pylist())
        tokens = [e.ids + [self.eos] for e in encoded]
        is_val = [
            int(h[:8], 16) % 10_000 < self.val_cutoff for h in batch.column("hash").to_pylist()
        ]
        return pa.table(
            {
                "tokens": pa.array(tokens, pa.list_(pa.int32())),
                "val": pa.array(is_val),
                "source": batch.column("source"),
            }
        )


def run(config: DataConfig) -> dict[str, Any]:
    """Curate ``config.corpus`` into ``config.output``; return the manifest."""
    started = time.time()
    with Stage("data: reading") as stage:
        files = resolve_source(config.corpus)
        stage.note(f"{len(files)} files from {config.corpus}")
    docs = ray.data.from_items([{"path": f} for f in files]).flat_map(
        _read, fn_kwargs={"split": config.split, "text_field": config.text_field}
    )
    if config.max_documents:
        docs = docs.limit(config.max_documents)

    with Stage("data: normalise + filter") as stage:
        curated = docs.map_batches(
            _curate, batch_format="pyarrow", fn_kwargs={"quality": config.quality}
        ).materialize()
        stats = _count_drops(curated)
        stage.note(f"{stats['documents_in']} documents in, {stats['documents_kept']} kept")
    if stats["documents_kept"] == 0:
        raise RayllmError(
            f"every one of the {stats['documents_in']} documents of {config.corpus!r} was "
            f"filtered out ({_top_reasons(stats)}); loosen data.quality or check the corpus"
        )

    kept = curated.filter(expr="drop == ''")
    if config.exact_dedup:
        with Stage("data: exact dedup") as stage:
            kept = kept.groupby("hash").map_groups(_first_of_group, batch_format="pyarrow")
            kept = kept.materialize()
            unique = kept.count()
            stats["exact_duplicates"] = stats["documents_kept"] - unique
            stats["documents_kept"] = unique
            stage.note(f"{stats['exact_duplicates']} exact duplicates removed")

    staging = f"{config.output.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"
    fs, staging_path = fsspec.core.url_to_fs(staging)
    fs.makedirs(staging_path, exist_ok=True)
    with Stage("data: train tokenizer") as stage:
        texts = (row["text"] for row in kept.iter_rows())
        tokenizer = train_tokenizer(texts, config.tokenizer)
        with tempfile.TemporaryDirectory(prefix="rayllm-tokenizer-") as local:
            save_tokenizer(tokenizer, local)
            fs.put(local + "/", f"{staging_path}/tokenizer", recursive=True)
        stage.note(f"BPE vocabulary {len(tokenizer)}")

    with Stage("data: tokenise + pack") as stage:
        tokenised = kept.map_batches(
            _Tokenise,
            fn_constructor_kwargs={
                "tokenizer_json": tokenizer.backend_tokenizer.to_str(),
                "eos_token_id": tokenizer.eos_token_id,
                "val_fraction": config.val_fraction,
            },
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
            batch_size=256,
        )
        writers = {
            split: ShardWriter(
                fs, staging_path, split, config.seq_len, config.sequences_per_shard, len(tokenizer)
            )
            for split in ("train", "val")
        }
        for batch in tokenised.iter_batches(batch_format="pyarrow", batch_size=1024):
            for tokens, is_val in zip(
                batch.column("tokens").to_numpy(zero_copy_only=False),
                batch.column("val").to_pylist(),
                strict=True,
            ):
                writers["val" if is_val else "train"].add(tokens)
        shards = {split: writer.close() for split, writer in writers.items()}
        stats["tokens"] = {split: s["tokens"] for split, s in shards.items()}
        stats["sequences"] = {split: s["sequences"] for split, s in shards.items()}
        stage.note(
            f"{stats['sequences']['train']} train / {stats['sequences']['val']} val sequences "
            f"of {config.seq_len} tokens"
        )
    if stats["sequences"]["train"] == 0 or stats["sequences"]["val"] == 0:
        raise RayllmError(
            f"the corpus gave {stats['sequences']} sequences of {config.seq_len} tokens; both "
            "splits need at least one: use a larger corpus, a smaller data.seq_len or a larger "
            "data.val_fraction"
        )

    stats["seconds"] = round(time.time() - started, 1)
    manifest = {
        "format": "rayllm.shards/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "corpus": config.corpus,
        "source_files": files,
        "config": config.model_dump(mode="json"),
        "seq_len": config.seq_len,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer": "tokenizer",
        "shards": {split: s["files"] for split, s in shards.items()},
        "stats": stats,
    }
    with fs.open(f"{staging_path}/stats.json", "w") as out:
        json.dump(stats, out, indent=2)
    with fs.open(f"{staging_path}/manifest.json", "w") as out:
        json.dump(manifest, out, indent=2)
    _publish_folder(fs, staging_path, fsspec.core.url_to_fs(config.output)[1])
    return manifest


def _count_drops(curated: ray.data.Dataset) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    documents = bytes_in = bytes_kept = bad_bytes = 0
    for batch in curated.select_columns(["text", "drop", "bad_bytes"]).iter_batches(
        batch_format="pyarrow", batch_size=4096
    ):
        for text, drop, bad in zip(
            *(batch.column(c).to_pylist() for c in batch.column_names), strict=True
        ):
            documents += 1
            size = len(text.encode())
            bytes_in += size
            bad_bytes += bad
            if drop:
                reasons[drop] += 1
            else:
                bytes_kept += size
    return {
        "documents_in": documents,
        "documents_kept": documents - sum(reasons.values()),
        "bytes_in": bytes_in,
        "bytes_kept": bytes_kept,
        "undecodable_bytes": bad_bytes,
        "dropped": dict(reasons.most_common()),
    }


def _top_reasons(stats: dict[str, Any]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in list(stats["dropped"].items())[:3])


def _publish_folder(fs: fsspec.AbstractFileSystem, staging: str, target: str) -> None:
    """Replace ``target`` by the finished ``staging`` folder (a rename on local disks)."""
    if fs.exists(f"{target}/manifest.json"):
        fs.rm(f"{target}/manifest.json")  # unpublish first: readers never see a mixed set
    if fs.exists(target):
        fs.rm(target, recursive=True)
    fs.mv(staging, target, recursive=True)


def load_manifest(url: str) -> dict[str, Any]:
    """The manifest of a finished shard set, or a clear error when there is none."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{path}/manifest.json"):
        raise RayllmError(
            f"{url} holds no finished token shards (no manifest.json); run `rayllm data` first "
            "or point train.data at the output of a finished data run"
        )
    with fs.open(f"{path}/manifest.json") as handle:
        return json.load(handle)
