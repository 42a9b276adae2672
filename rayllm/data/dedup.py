"""Deduplication on Ray Data: exact (content hash), paragraph and fuzzy (MinHash-LSH).

Fuzzy dedup, after Broder (1997) and the LSH banding of Leskovec et al. (Mining of Massive
Datasets, ch. 3), as datatrove's ``MinhashDedup*`` steps do it:

1. signatures: word n-gram shingles of each document, ``bands * rows`` min-hashes (numpy,
   one vectorised universal hash per permutation);
2. buckets: one row per (band, band hash, document); buckets holding two or more documents
   are found with a vectorised count and a join, never by collecting signatures anywhere;
3. candidate pairs inside each bucket are confirmed by the signatures' estimated Jaccard
   similarity (a join of the pairs with the signatures), which removes LSH's false positives;
4. clusters are the connected components of the confirmed pairs (union-find over the pairs,
   which are few, on the driver); every member but the lowest id is removed.

Each step returns what it removes (``Removals``: ids, and paragraph positions), never the
documents themselves: the text is never shuffled, only these small index rows, and the
removals are applied as the documents stream past on their way to the tokenizer.

Signatures stay in the cluster's object store (spilling to disk), so they need not fit in one
worker's memory.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash
from ray.data.aggregate import Count, Min

from rayllm.data.config import FuzzyDedupConfig, ParagraphDedupConfig

MERSENNE = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)
_NON_WORD = re.compile(r"[^\w]+")


def index_bytes_per_document(config: FuzzyDedupConfig) -> int:
    """Roughly what one document adds to the dedup index: its band rows, its signature, and its
    content hash and source for exact dedup."""
    return 16 * config.bands + 4 * config.bands * config.rows + 160


def document_id(file_index: int, position: int) -> int:
    """A document's id: its file's place in the corpus, then its place in that file. Ids sort
    in corpus order, so every dedup step keeps the earliest occurrence by keeping the lowest."""
    return (file_index << 32) | position


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


def _repeated_values(dataset: ray.data.Dataset, column: str, partitions: int) -> ray.data.Dataset:
    """The values of ``column`` that occur two or more times (a vectorised count)."""
    return (
        dataset.groupby(column, num_partitions=partitions)
        .count()
        .map_batches(_repeated, fn_kwargs={"column": column}, batch_format="pyarrow")
        .materialize()
    )


def _repeated(counts: pa.Table, column: str) -> pa.Table:
    return pa.table({column: counts.column(column).filter(pc.greater(counts.column("count()"), 1))})


def _columns(dataset: ray.data.Dataset, *names: str) -> list[np.ndarray]:
    """Whole columns of a small dataset (dedup decisions) gathered on the driver."""
    batches = list(dataset.select_columns(list(names)).iter_batches(batch_format="numpy"))
    return [np.concatenate([batch[name] for batch in batches]) for name in names]


def _star_edges(group: pa.Table) -> pa.Table:
    """Pairs (lowest id, other) for one bucket."""
    ids = np.unique(group.column("id").to_numpy())
    return pa.table({"a": np.full(len(ids) - 1, ids[0], dtype=np.int64), "b": ids[1:]})


def _unique_pairs(batch: pa.Table) -> pa.Table:
    """Drop the repeats of a pair within one block: a near-duplicate pair meets in most bands,
    and a partition's bands arrive together, so this shrinks the global dedup of pairs."""
    pairs = np.unique(
        np.stack([batch.column("a").to_numpy(), batch.column("b").to_numpy()]), axis=1
    )
    return pa.table({"a": pairs[0], "b": pairs[1]})


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
    candidates = (
        colliding.groupby("key", num_partitions=partitions)
        .map_groups(_star_edges, batch_format="pyarrow")
        .map_batches(_unique_pairs, batch_size=None, batch_format="pyarrow")
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


def near_duplicates(
    docs: ray.data.Dataset, config: FuzzyDedupConfig, partitions: int
) -> dict[str, Any]:
    """The near-duplicates in ``docs`` (columns ``id`` and ``text``): every member of a cluster
    but its lowest id, as ``removed_ids`` (sorted), with the pairs and cluster statistics."""
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
    shared = _repeated_values(bands, "key", partitions)
    confirmed = (
        _confirmed_pairs(bands, shared, signatures, config, partitions) if shared.count() else []
    )
    roots = clusters([(row["a"], row["b"]) for row in confirmed])
    removed = np.array(sorted(doc for doc, root in roots.items() if doc != root), np.int64)
    sizes = Counter(Counter(roots.values()).values())
    return {
        "fuzzy_pairs": len(confirmed),
        "fuzzy_clusters": len(set(roots.values())),
        "fuzzy_removed": len(removed),
        "fuzzy_cluster_sizes": {str(size): count for size, count in sorted(sizes.items())},
        "removed_ids": removed,
        "pairs": [(r["a"], r["b"], r["similarity"]) for r in confirmed],
    }


def exact_duplicates(index: ray.data.Dataset, partitions: int) -> np.ndarray:
    """Ids of the exact duplicates in ``index`` (columns ``id`` and ``hash``): every document
    whose content hash is shared, but the first of each group in corpus order (lowest id)."""
    groups = (
        index.groupby("hash", num_partitions=partitions)
        .aggregate(Count(), Min("id", alias_name="first"))
        .map_batches(_shared_hashes, batch_format="pyarrow")
        .materialize()
    )
    if not groups.count():
        return np.empty(0, np.int64)
    copies = index.join(groups, "inner", num_partitions=partitions, on=("hash",)).map_batches(
        _later_copies_of_document, batch_format="pyarrow"
    )
    return np.sort(_columns(copies, "id")[0])


def _shared_hashes(groups: pa.Table) -> pa.Table:
    return groups.select(["hash", "first"]).filter(pc.greater(groups.column("count()"), 1))


def _later_copies_of_document(batch: pa.Table) -> pa.Table:
    later = pc.not_equal(batch.column("id"), batch.column("first"))
    return batch.select(["id"]).filter(later)


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
    """All occurrences of one paragraph but the first in corpus order (lowest document id,
    then position in the document)."""
    order = sorted(
        range(group.num_rows),
        key=lambda i: (group.column("id")[i].as_py(), group.column("position")[i].as_py()),
    )
    return group.take(order[1:]).select(["id", "position"])


def paragraph_duplicates(
    docs: ray.data.Dataset, config: ParagraphDedupConfig, partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every repeat of a long paragraph after its first occurrence in corpus order, as
    parallel arrays of document ids and paragraph positions sorted by id."""
    rows = docs.map_batches(
        _paragraph_rows, fn_kwargs={"min_chars": config.min_chars}, batch_format="pyarrow"
    ).materialize()
    repeated = _repeated_values(rows, "hash", partitions)
    if not repeated.count():
        return np.empty(0, np.int64), np.empty(0, np.int32)
    later = (
        rows.join(repeated, "inner", num_partitions=partitions, on=("hash",))
        .groupby("hash", num_partitions=partitions)
        .map_groups(_later_copies, batch_format="pyarrow")
    )
    ids, positions = _columns(later, "id", "position")
    order = np.argsort(ids, kind="stable")
    return ids[order], positions[order]


@dataclass
class Removals:
    """What dedup decided, small enough to hand to every task (8 to 12 bytes per removal):
    whole documents by id, and paragraphs by (document id, position)."""

    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    paragraph_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    paragraph_positions: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))

    def remove(self, ids: np.ndarray) -> None:
        self.ids = np.union1d(self.ids, ids)

    def apply(self, batch: pa.Table) -> pa.Table:
        """Ray Data UDF: the batch without the removed documents and paragraphs."""
        batch = batch.filter(~np.isin(batch.column("id").to_numpy(), self.ids))
        ids = batch.column("id").to_numpy()
        edited = np.flatnonzero(np.isin(ids, self.paragraph_ids))
        if not len(edited):
            return batch
        texts = batch.column("text").to_pylist()
        for row in edited:
            first, last = (
                np.searchsorted(self.paragraph_ids, ids[row], side="left"),
                np.searchsorted(self.paragraph_ids, ids[row], side="right"),
            )
            drop = set(self.paragraph_positions[first:last].tolist())
            texts[row] = "\n\n".join(
                p for i, p in enumerate(_paragraphs(texts[row])) if i not in drop
            ).strip()
        batch = batch.set_column(
            batch.column_names.index("text"), "text", pa.array(texts, pa.string())
        )
        return batch.filter(pc.not_equal(batch.column("text"), ""))
