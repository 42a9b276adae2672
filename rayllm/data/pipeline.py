"""The curation pipeline on Ray Data: documents in, a tokenizer and packed token shards out.

    read -> normalise -> language -> Gopher quality -> Gopher repetition -> C4 -> bad words
         -> PII scrub -> exact dedup -> paragraph dedup -> fuzzy dedup -> train tokenizer
         -> tokenise -> pack

Reading and the per-document blocks run in one streaming pass (each document carrying the
reason it was dropped) that writes the curated documents to Parquet. The dedup steps are
distributed (hash shuffles and joins of small index rows) and return what they remove; the
removals are applied as the documents stream to the tokenizer trainer and then to the
packer, which cuts sequences in order on the driver, so no token is lost between shards.
Everything is written to a staging folder and moved into place with the manifest last: a shard
set without a manifest is incomplete and training refuses it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import ray
from fsspec.implementations.local import LocalFileSystem
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from rayllm.data.blocks.base import Block, Column
from rayllm.data.blocks.c4 import C4, BadWords
from rayllm.data.blocks.classifier import QualityClassifier, QualityModel
from rayllm.data.blocks.gopher import (
    GopherQuality,
    GopherRepetition,
)
from rayllm.data.blocks.language import LanguageId
from rayllm.data.blocks.normalise import Normaliser
from rayllm.data.blocks.pii import PIIScrubber
from rayllm.data.classifier_training import quality_model
from rayllm.data.config import DataConfig
from rayllm.data.corpora import resolve_source
from rayllm.data.dedup import (
    Removals,
    document_id,
    exact_duplicates,
    index_bytes_per_document,
    near_duplicates,
    paragraph_duplicates,
)
from rayllm.data.hashing import content_hash
from rayllm.data.packing import ShardWriter
from rayllm.data.readers import read_documents
from rayllm.data.shards import MANIFEST
from rayllm.data.stats import StatsCollector, print_stats
from rayllm.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from rayllm.errors import RayllmError
from rayllm.paths import absolute_url, check_replaceable, staged_folder
from rayllm.progress import Stage


def build_blocks(config: DataConfig, quality: QualityModel | None = None) -> list[Block]:
    """The per-document blocks, in the order they run (``quality``: the trained classifier)."""
    blocks: list[Block] = [Normaliser(config.normalise)]
    optional = [
        (config.language, LanguageId),
        (config.gopher_quality, GopherQuality),
        (config.gopher_repetition, GopherRepetition),
        (config.c4, C4),
        (config.bad_words, BadWords),
        (config.pii, PIIScrubber),
    ]
    blocks += [block(settings) for settings, block in optional if settings.enabled]
    if config.classifier.enabled:
        blocks.insert(
            -1 if config.pii.enabled else len(blocks),
            QualityClassifier(config.classifier, quality or quality_model(config.classifier)),
        )
    return blocks


READ_CHUNK = 1024
"""Documents per table the reader hands on: memory holds a chunk, never a whole file."""


def _read(batch: dict[str, Any], split: str, text_field: str, strict: bool) -> Iterator[pa.Table]:
    """Ray Data UDF: the documents of each file, streamed out in tables of ``READ_CHUNK``, each
    with its id in corpus order (:func:`document_id`)."""
    for path, file_index in zip(batch["path"], batch["file_index"], strict=True):
        chunk = []
        documents = read_documents(str(path), split=split, text_field=text_field)
        for position, doc in enumerate(documents):
            if strict and doc["bad_record"]:
                raise RayllmError(f"{doc['source']}: {doc['bad_record']} (data.strict is set)")
            chunk.append(doc | {"id": document_id(int(file_index), position)})
            if len(chunk) == READ_CHUNK:
                yield pa.Table.from_pylist(chunk)
                chunk = []
        if chunk:
            yield pa.Table.from_pylist(chunk)


PARQUET_ROWS = 4096
"""Documents per curated Parquet file (at least): few files, since each costs a read task."""


class _Curate:
    """Ray Data UDF: every block on every document; records where and why each one is dropped,
    and the columns the blocks add (``Block.columns``)."""

    def __init__(self, config: DataConfig, quality: QualityModel | None):
        self.blocks = build_blocks(config, quality)
        self.columns = block_columns(self.blocks)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {
            k: [] for k in ("text", "source", "id", "hash", "drop", "stage", "example")
        }
        out |= {k: [] for k in ("bytes_in", "bytes_out", *self.columns)}
        for row in batch.to_pylist():
            doc = {"text": row["text"]}
            out["bytes_in"].append(len(row["text"].encode()))
            drop, stage = (
                (f"read.{row['bad_record']}", 0)
                if row["bad_record"]
                else ("", len(self.blocks) + 1)
            )
            for index, block in enumerate(self.blocks, start=1):
                if drop:
                    break
                if (reason := block.apply(doc)) is not None:
                    drop, stage = f"{block.name}.{reason}", index
            out["text"].append("" if drop else doc["text"])
            out["source"].append(row["source"])
            out["hash"].append(content_hash(doc["text"]))
            out["id"].append(row["id"])
            out["drop"].append(drop)
            out["stage"].append(stage)
            out["example"].append(row["text"][:160] if drop else "")
            out["bytes_out"].append(len(doc["text"].encode()) if not drop else 0)
            for key, column in self.columns.items():
                out[key].append(doc.get(key, column.default))
        types = {key: _ARROW_TYPES[type(c.default)] for key, c in self.columns.items()}
        table = pa.table({k: pa.array(v, types.get(k)) for k, v in out.items()})
        return table.append_column("bad_bytes", batch.column("bad_bytes"))


_ARROW_TYPES = {int: pa.int64(), str: pa.string(), float: pa.float64(), type(None): pa.float64()}
"""Column types by default value: a block's score column (default None) is a nullable float."""


def block_columns(blocks: list[Block]) -> dict[str, Column]:
    """Every column the blocks add, in block order."""
    return {key: column for block in blocks for key, column in block.columns.items()}


class _Tokenise:
    """Ray Data UDF: token ids of each document, end-of-text appended, and its split.

    Documents go to the validation split by their content hash, so a document and its
    duplicates never straddle the two splits.
    """

    def __init__(self, tokenizer_json: str, eos_token_id: int, val_fraction: float):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos = eos_token_id
        self.val_cutoff = int(val_fraction * 10_000)

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoded = self.tokenizer.encode_batch(batch.column("text").to_pylist())
        tokens = [e.ids + [self.eos] for e in encoded]
        hashes = batch.column("hash").to_pylist()
        return pa.table(
            {
                "tokens": pa.array(tokens, pa.list_(pa.int32())),
                "val": pa.array([int(h[:8], 16) % 10_000 < self.val_cutoff for h in hashes]),
            }
        )


@dataclass(frozen=True)
class DataResult:
    output: str
    """The finished shard set: shards, tokenizer, ``stats.json`` and ``manifest.json``."""
    manifest: dict[str, Any]
    seconds: float

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest["stats"]


def run(config: DataConfig, report: bool = True) -> DataResult:
    """Curate ``config.corpus`` into ``config.output`` (``report``: print the stats table)."""
    started = time.time()
    config = config.with_work_paths()
    output = absolute_url(config.output)
    check_replaceable(output, config.overwrite, "data.output", "output")
    source = config.tokenizer.pretrained
    pretrained = load_tokenizer(source) if source else None  # a bad folder fails before work
    with Stage("data: reading") as stage:
        files = resolve_source(config.corpus)
        stage.note(f"{len(files)} files from {config.corpus}")
    with staged_folder(output) as (fs, staging), _data_context(config):
        docs = ray.data.from_items(
            [{"path": f, "file_index": index} for index, f in enumerate(files)]
        ).map_batches(
            _read,
            batch_size=1,
            fn_kwargs={
                "split": config.split,
                "text_field": config.text_field,
                "strict": config.strict,
            },
        )
        if config.max_documents:
            docs = docs.limit(config.max_documents)
        manifest = _curate(config, docs, files, fs, staging, started, pretrained)
    if report:
        print_stats(manifest["stats"])
    return DataResult(output, manifest, time.time() - started)


@contextmanager
def _data_context(config: DataConfig) -> Iterator[None]:
    """Ray Data settings for the curation run, restored afterwards."""
    context = ray.data.DataContext.get_current()
    settings = {
        # Each dedup step re-reads the curated Parquet. Ray 2.60's V2 file datasource spends
        # ~5 s listing files on every read; the V1 reader takes 0.2 s.
        "use_datasource_v2": False,
        # Every block the pipeline makes (read chunks, curated batches) stays under block_mb,
        # and so does what a hash shuffle's map task gathers (1 GB by default).
        "target_max_block_size": config.block_mb * 2**20,
        "shuffle_input_batch_bytes": config.block_mb * 2**20,
    }
    previous = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    # max_documents keeps the corpus's first documents, not whichever blocks finish first.
    execution, kept_order = context.execution_options, context.execution_options.preserve_order
    execution.preserve_order = kept_order or bool(config.max_documents)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(context, name, value)
        execution.preserve_order = kept_order


class _CuratedParquet:
    """The curated documents of a run, read back in blocks of ``block_mb``: only the kept ones,
    with every dedup removal decided so far applied as they stream past."""

    def __init__(self, url: str, block_mb: int, size: int, partitions: int):
        self.url = url
        # Ray would split even a small file into 2 blocks per CPU, and a task per block then
        # costs more than the work in it.
        self.blocks = max(partitions, math.ceil(size / (block_mb * 1e6)))
        self.removals = Removals()

    def read(self, columns: list[str]) -> ray.data.Dataset:
        """``columns`` of the documents the filters kept, before any dedup."""
        return (
            ray.data.read_parquet(
                self.url, columns=[*columns, "drop"], override_num_blocks=self.blocks
            )
            .filter(expr="drop == ''")
            .drop_columns(["drop"])
        )

    def documents(self) -> ray.data.Dataset:
        """``id``, ``hash`` and ``text`` of the documents still kept."""
        return self.read(["id", "hash", "text"]).map_batches(
            self.removals.apply, batch_format="pyarrow"
        )


def _deduplicate(
    config: DataConfig,
    curated: _CuratedParquet,
    partitions: int,
    stats: dict[str, Any],
    timings: dict[str, float],
) -> None:
    """Exact, paragraph, then fuzzy dedup, each seeing the removals of the ones before."""
    removals = curated.removals
    if config.exact_dedup:
        with Stage("data: exact dedup", timings, "exact_dedup") as stage:
            removals.remove(exact_duplicates(curated.read(["id", "hash"]), partitions))
            stats["exact_duplicates"] = len(removals.ids)
            stage.note(f"{stats['exact_duplicates']:,} exact duplicates removed")
    if config.paragraph_dedup.enabled:
        with Stage("data: paragraph dedup", timings, "paragraph_dedup") as stage:
            removals.paragraph_ids, removals.paragraph_positions = paragraph_duplicates(
                curated.documents(), config.paragraph_dedup, partitions
            )
            stats["paragraphs"] = {"paragraphs_removed": len(removals.paragraph_ids)}
            stage.note(f"{len(removals.paragraph_ids):,} repeated paragraphs removed")
    if config.fuzzy_dedup.enabled:
        with Stage("data: fuzzy dedup (MinHash-LSH)", timings, "fuzzy_dedup") as stage:
            fuzzy = near_duplicates(curated.documents(), config.fuzzy_dedup, partitions)
            removals.remove(fuzzy["removed_ids"])
            stats["fuzzy"] = {k: v for k, v in fuzzy.items() if k.startswith("fuzzy_")}
            stage.note(
                f"{fuzzy['fuzzy_removed']:,} near-duplicates in "
                f"{fuzzy['fuzzy_clusters']:,} clusters removed"
            )


def _curate(
    config: DataConfig,
    docs: ray.data.Dataset,
    files: list[str],
    fs: fsspec.AbstractFileSystem,
    staging: str,
    started: float,
    pretrained: PreTrainedTokenizerFast | None,
) -> dict[str, Any]:
    """Every stage, writing into ``staging``; the manifest is the last file written. The
    tokenizer is trained on the curated text unless a ``pretrained`` one is given.

    The curated documents go to Parquet once (``curated/``: every document with its drop
    reason and the columns the blocks add; kept unless ``keep_curated`` is off); each
    dedup step then reads only the columns it needs and returns what it removes, and the
    removals are applied as the documents stream to the tokenizer: memory holds batches and
    the small dedup index, never the corpus.
    """
    staging_path = staging
    staging_url = staging if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(staging)
    work = f"{staging_url}/curated"
    timings: dict[str, float] = {}
    quality = quality_model(config.classifier) if config.classifier.enabled else None
    blocks = build_blocks(config, quality)
    with Stage(f"data: {' -> '.join(b.name for b in blocks)}", timings, "curate") as stage:
        docs.map_batches(
            _Curate,
            fn_constructor_kwargs={"config": config, "quality": quality},
            batch_format="pyarrow",
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.workers),
        ).write_parquet(work, min_rows_per_file=PARQUET_ROWS)
        collector = StatsCollector(["read", *(b.name for b in blocks)], block_columns(blocks))
        collector.add_curated(ray.data.read_parquet(work))
        stats = collector.stats
        stage.note(f"{stats['documents_in']:,} documents in, {stats['documents_kept']:,} kept")
    if stats["documents_kept"] == 0:
        raise RayllmError(
            f"every one of the {stats['documents_in']} documents of {config.corpus!r} was "
            f"filtered out ({collector.top_reasons()}); loosen the filters or check the corpus"
        )

    # Hash-shuffle partitions: one per worker at least, and more as the dedup index grows, so
    # that none holds more than a block's worth of it.
    index = stats["documents_kept"] * index_bytes_per_document(config.fuzzy_dedup)
    partitions = max(2, config.workers, math.ceil(index / (config.block_mb * 2**20)))
    curated = _CuratedParquet(work, config.block_mb, fs.du(f"{staging_path}/curated"), partitions)
    _deduplicate(config, curated, partitions, stats, timings)

    source = config.tokenizer.pretrained
    title = (
        f"data: tokenizer of {source}"
        if source
        else f"data: train {config.tokenizer.kind} tokenizer"
    )
    with Stage(title, timings, "tokenizer") as stage:
        tokenizer = pretrained or train_tokenizer(
            (row["text"] for row in curated.documents().select_columns(["text"]).iter_rows()),
            config.tokenizer,
        )
        with tempfile.TemporaryDirectory(prefix="rayllm-tokenizer-") as local:
            save_tokenizer(tokenizer, local)
            fs.put(local + "/", f"{staging_path}/tokenizer", recursive=True)
        stage.note(f"vocabulary {len(tokenizer):,}")

    with Stage("data: tokenise + pack", timings, "pack") as stage:
        tokenised = curated.documents().map_batches(
            _Tokenise,
            fn_constructor_kwargs={
                "tokenizer_json": tokenizer.backend_tokenizer.to_str(),
                "eos_token_id": tokenizer.eos_token_id,
                "val_fraction": config.val_fraction,
            },
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.workers),
            batch_size=256,
        )
        writers = {
            split: ShardWriter(
                fs, staging_path, split, config.seq_len, config.sequences_per_shard, len(tokenizer)
            )
            for split in ("train", "val")
        }
        documents_kept = 0
        for batch in tokenised.iter_batches(batch_format="pyarrow", batch_size=1024):
            documents_kept += batch.num_rows
            for tokens, is_val in zip(
                batch.column("tokens").to_numpy(zero_copy_only=False),
                batch.column("val").to_pylist(),
                strict=True,
            ):
                writers["val" if is_val else "train"].add(tokens)
        shards = {split: writer.close() for split, writer in writers.items()}
        stats["tokens"] = {split: s["tokens"] for split, s in shards.items()}
        stats["sequences"] = {split: s["sequences"] for split, s in shards.items()}
        if "paragraphs" in stats:  # documents left empty once their repeats were cut
            stats["paragraphs"]["documents_emptied"] = (
                stats["documents_kept"]
                - stats.get("exact_duplicates", 0)
                - stats.get("fuzzy", {}).get("fuzzy_removed", 0)
                - documents_kept
            )
        stats["documents_kept"] = documents_kept
        stage.note(
            f"{stats['sequences']['train']:,} train / {stats['sequences']['val']:,} val sequences of {config.seq_len} tokens"
        )
    if stats["sequences"]["train"] == 0 or stats["sequences"]["val"] == 0:
        raise RayllmError(
            f"the corpus gave {stats['sequences']} sequences of {config.seq_len} tokens; both "
            "splits need at least one: use a larger corpus, a smaller data.seq_len or a larger "
            "data.val_fraction"
        )

    stats["seconds"] = round(time.time() - started, 1)
    stats["stage_seconds"] = timings
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
    if not config.keep_curated:
        fs.rm(f"{staging_path}/curated", recursive=True)
    fs.pipe_file(f"{staging_path}/stats.json", json.dumps(stats, indent=2).encode())
    fs.pipe_file(f"{staging_path}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    return manifest
