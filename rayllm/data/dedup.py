"""Deduplication on Ray Data: exact (content hash) and fuzzy (MinHash-LSH), both distributed.

Fuzzy dedup, after Broder (1997) and the LSH banding of Leskovec et al. (Mining of Massive
Datasets, ch. 3), as datatrove's ``MinhashDedup*`` steps do it:

1. signatures: word n-gram shingles of each document, ``bands * rows`` min-hashes (numpy,
   one vectorised universal hash per permutation);
2. buckets: one row per (band, band hash, document); buckets holding two or more documents
   are found with a vectorised count and a join, never by collecting signatures anywhere;
3. candidate pairs inside each bucket are confirmed by the signatures' estimated Jaccard
   similarity (a join of the pairs with the signatures), which removes LSH's false positives;
4. clusters are the connected components of the confirmed pairs (union-find over the pairs,
   which are few, on the driver); every member but the lowest id is removed (an anti-join).

Signatures stay in the cluster's object store (spilling to disk), so they need not fit in one
worker's memory.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash

from rayllm.config import StageConfig

MERSENNE = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)
_NON_WORD = re.compile(r"[^\w]+")


class FuzzyDedupConfig(StageConfig):
    """Defaults tuned on the Shakespeare modern / First Folio pairs (see README, Performance)."""

    enabled: bool = True
    ngram: int = 3
    """Words per shingle."""
    bands: int = 64
    rows: int = 2
    """bands x rows min-hashes per document; a pair becomes a candidate when any band matches."""
    threshold: float = 0.2
    """Estimated Jaccard similarity at which a candidate pair counts as a duplicate."""
    seed: int = 1


def document_id(content_hash: str) -> int:
    """A 63-bit id from the content hash (unique once exact duplicates are gone)."""
    return int(content_hash[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


class MinHasher:
    def __init__(self, config: FuzzyDedupConfig):
        rng = np.random.default_rng(config.seed)
        permutations = config.bands * config.rows
        self.a = rng.integers(1, int(MERSENNE), size=permutations, dtype=np.uint64)
        self.b = rng.integers(0, int(MERSENNE), size=permutations, dtype=np.uint64)
        self.ngram = config.ngram

    def shingles(self, text: str) -> np.ndarray:
        words = _NON_WORD.sub(" ", text.lower()).split()
        grams = {" ".join(words[i : i + self.ngram]) for i in range(len(words) - self.ngram + 1)}
        return np.fromiter(
            (xxhash.xxh32_intdigest(g.encode()) for g in grams), dtype=np.uint64, count=len(grams)
        )

    def signature(self, text: str) -> np.ndarray | None:
        """``bands * rows`` min-hashes (uint32), or None for a text shorter than one shingle."""
        hashes = self.shingles(text)
        if len(hashes) == 0:
            return None
        with np.errstate(over="ignore"):  # wrap-around multiply, as datasketch does
            values = (hashes[:, None] * self.a + self.b) % MERSENNE & MAX_HASH
        return values.min(axis=0).astype(np.uint32)


def estimated_jaccard(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.mean(first == second))


class _Signatures:
    """Ray Data UDF: (id, signature) of each document long enough to have one."""

    def __init__(self, config: FuzzyDedupConfig):
        self.hasher = MinHasher(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, signatures = [], []
        for doc_id, text in zip(
            batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True
        ):
            signature = self.hasher.signature(text)
            if signature is not None:
                ids.append(doc_id)
                signatures.append(signature)
        width = len(self.hasher.a)
        flat = np.concatenate(signatures) if signatures else np.empty(0, np.uint32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint32()), width)
        return pa.table({"id": pa.array(ids, pa.int64()), "signature": column})


def _band_rows(batch: pa.Table, bands: int, rows: int) -> pa.Table:
    """One row per (band, document): the band's hash, salted with the band number."""
    signatures = (
        batch.column("signature").combine_chunks().flatten().to_numpy().reshape(-1, bands, rows)
    )
    keys = np.empty((len(signatures), bands), dtype=np.int64)
    for band in range(bands):
        chunk = np.ascontiguousarray(signatures[:, band, :])
        for i, row in enumerate(chunk):
            keys[i, band] = xxhash.xxh64_intdigest(row.tobytes(), seed=band) & 0x7FFF_FFFF_FFFF_FFFF
    ids = np.repeat(batch.column("id").to_numpy(), bands)
    return pa.table({"key": keys.ravel(), "id": ids})


def _repeated(counts: pa.Table, column: str) -> pa.Table:
    """From a ``groupby(column).count()`` batch: the values that occur two or more times."""
    return pa.table({column: counts.column(column).filter(pc.greater(counts.column("count()"), 1))})


def _star_edges(group: pa.Table) -> pa.Table:
    """Pairs (lowest id, other) for one bucket."""
    ids = np.unique(group.column("id").to_numpy())
    return pa.table({"a": np.full(len(ids) - 1, ids[0], dtype=np.int64), "b": ids[1:]})


def _confirm(batch: pa.Table, threshold: float) -> pa.Table:
    first = batch.column("signature_a").combine_chunks().flatten().to_numpy()
    second = batch.column("signature_b").combine_chunks().flatten().to_numpy()
    width = len(first) // max(1, batch.num_rows)
    similarity = (
        (first.reshape(-1, width) == second.reshape(-1, width)).mean(axis=1)
        if batch.num_rows
        else []
    )
    keep = np.asarray(similarity) >= threshold
    return pa.table(
        {
            "a": batch.column("a").filter(keep),
            "b": batch.column("b").filter(keep),
            "similarity": np.asarray(similarity)[keep],
        }
    )


def clusters(pairs: list[tuple[int, int]]) -> dict[int, int]:
    """Union-find: each document of a pair -> the lowest id of its connected component."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def _confirmed_pairs(
    bands: ray.data.Dataset,
    shared: ray.data.Dataset,
    signatures: ray.data.Dataset,
    config: FuzzyDedupConfig,
    partitions: int,
) -> list[dict[str, Any]]:
    """Candidate pairs from the shared buckets, kept if their signatures agree enough."""
    colliding = bands.join(shared, "inner", num_partitions=partitions, on=("key",))
    candidates = colliding.groupby("key", num_partitions=partitions).map_groups(
        _star_edges, batch_format="pyarrow"
    )
    left = signatures.rename_columns({"id": "a", "signature": "signature_a"})
    right = signatures.rename_columns({"id": "b", "signature": "signature_b"})
    return (
        candidates.groupby(["a", "b"], num_partitions=partitions)
        .count()
        .select_columns(["a", "b"])
        .join(left, "inner", num_partitions=partitions, on=("a",))
        .join(right, "inner", num_partitions=partitions, on=("b",))
        .map_batches(_confirm, fn_kwargs={"threshold": config.threshold}, batch_format="pyarrow")
        .take_all()
    )


def fuzzy_dedup(
    docs: ray.data.Dataset, config: FuzzyDedupConfig, partitions: int
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Drop near-duplicates from ``docs`` (columns ``id`` and ``text``); return kept docs and stats."""
    signatures = (
        docs.select_columns(["id", "text"])
        .map_batches(
            _Signatures,
            fn_constructor_kwargs={"config": config},
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=partitions),
        )
        .materialize()
    )
    bands = signatures.map_batches(
        _band_rows, fn_kwargs={"bands": config.bands, "rows": config.rows}, batch_format="pyarrow"
    ).materialize()
    shared = (
        bands.groupby("key", num_partitions=partitions)
        .count()
        .map_batches(_repeated, fn_kwargs={"column": "key"}, batch_format="pyarrow")
        .materialize()
    )
    confirmed = (
        _confirmed_pairs(bands, shared, signatures, config, partitions) if shared.count() else []
    )
    roots = clusters([(row["a"], row["b"]) for row in confirmed])
    removed = sorted(doc for doc, root in roots.items() if doc != root)
    sizes = Counter(Counter(roots.values()).values())
    stats = {
        "fuzzy_pairs": len(confirmed),
        "fuzzy_clusters": len(set(roots.values())),
        "fuzzy_removed": len(removed),
        "fuzzy_cluster_sizes": {str(size): count for size, count in sorted(sizes.items())},
    }
    if removed:
        dropped = ray.data.from_arrow(pa.table({"id": pa.array(removed, pa.int64())}))
        docs = docs.join(dropped, "left_anti", num_partitions=partitions, on=("id",))
    return docs, stats | {
        "removed_ids": removed,
        "pairs": [(r["a"], r["b"], r["similarity"]) for r in confirmed],
    }


class ParagraphDedupConfig(StageConfig):
    """Paragraph-level dedup across documents: repeated boilerplate, quoted passages."""

    enabled: bool = True
    min_chars: int = 100
    """Shorter paragraphs are never removed (headings, stage directions, short replies)."""


def _paragraphs(text: str) -> list[str]:
    return text.split("\n\n")


def _paragraph_rows(batch: pa.Table, min_chars: int) -> pa.Table:
    """One row per long paragraph: its folded hash, document id and position."""
    hashes, ids, positions = [], [], []
    for doc_id, text in zip(
        batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True
    ):
        for position, paragraph in enumerate(_paragraphs(text)):
            if len(paragraph) >= min_chars:
                folded = " ".join(paragraph.lower().split())
                hashes.append(xxhash.xxh64_intdigest(folded.encode()) & 0x7FFF_FFFF_FFFF_FFFF)
                ids.append(doc_id)
                positions.append(position)
    return pa.table(
        {
            "hash": pa.array(hashes, pa.int64()),
            "id": pa.array(ids, pa.int64()),
            "position": pa.array(positions, pa.int32()),
        }
    )


def _later_copies(group: pa.Table) -> pa.Table:
    """All occurrences of one paragraph but the first (lowest document id, then position)."""
    order = sorted(
        range(group.num_rows),
        key=lambda i: (group.column("id")[i].as_py(), group.column("position")[i].as_py()),
    )
    return group.take(order[1:]).select(["id", "position"])


def _positions_per_document(group: pa.Table) -> pa.Table:
    positions = sorted(set(group.column("position").to_pylist()))
    return pa.table(
        {
            "id": [group.column("id")[0].as_py()],
            "drop_positions": pa.array([positions], pa.list_(pa.int32())),
        }
    )


def _remove_paragraphs(batch: pa.Table) -> pa.Table:
    texts = []
    for text, drop in zip(
        batch.column("text").to_pylist(), batch.column("drop_positions").to_pylist(), strict=True
    ):
        if drop:
            removed = set(drop)
            text = "\n\n".join(
                p for i, p in enumerate(_paragraphs(text)) if i not in removed
            ).strip()
        texts.append(text)
    batch = batch.drop_columns(["drop_positions", "text"]).append_column(
        "text", pa.array(texts, pa.string())
    )
    return batch.filter(pc.not_equal(batch.column("text"), ""))


def paragraph_dedup(
    docs: ray.data.Dataset, config: ParagraphDedupConfig, partitions: int
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Remove every repeat of a long paragraph after its first occurrence in the corpus."""
    rows = docs.map_batches(
        _paragraph_rows, fn_kwargs={"min_chars": config.min_chars}, batch_format="pyarrow"
    ).materialize()
    repeated = (
        rows.groupby("hash", num_partitions=partitions)
        .count()
        .map_batches(_repeated, fn_kwargs={"column": "hash"}, batch_format="pyarrow")
        .materialize()
    )
    if not repeated.count():
        return docs, {"paragraphs_removed": 0, "documents_emptied": 0}
    copies = rows.join(repeated, "inner", num_partitions=partitions, on=("hash",))
    later = (
        copies.groupby("hash", num_partitions=partitions)
        .map_groups(_later_copies, batch_format="pyarrow")
        .materialize()
    )
    per_doc = later.groupby("id", num_partitions=partitions).map_groups(
        _positions_per_document, batch_format="pyarrow"
    )
    before = docs.count()
    cleaned = (
        docs.join(per_doc, "left_outer", num_partitions=partitions, on=("id",))
        .map_batches(_remove_paragraphs, batch_format="pyarrow")
        .materialize()
    )
    return cleaned, {
        "paragraphs_removed": later.count(),
        "documents_emptied": before - cleaned.count(),
    }
