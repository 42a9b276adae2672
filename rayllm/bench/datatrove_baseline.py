"""The datatrove side of ``rayllm bench data``: Gopher + C4 filters and MinHash dedup.

Run by the benchmark in its own virtual environment (datatrove pinned there, never a rayllm
dependency), so it imports nothing from rayllm. It follows datatrove's own MinHash example:
filter and sign, bucket, cluster, then drop the duplicates, each stage on a
``LocalPipelineExecutor`` with the same number of workers rayllm is given.

    python datatrove_baseline.py INPUT_FOLDER WORK_FOLDER WORKERS NGRAM BANDS ROWS C4_MIN_SENTENCES

prints one JSON object: documents in and kept, the documents each step passed on (from
datatrove's own stats), and seconds per stage and in all.
"""

import gzip
import json
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


def main(
    source: str, work: str, workers: int, ngram: int, bands: int, rows: int, min_sentences: int
) -> None:
    files = len(list(Path(source).glob("*.jsonl")))
    config = MinhashConfig(n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows)
    stages = {
        "filter + sign": (
            [
                JsonlReader(source, glob_pattern="*.jsonl"),
                GopherRepetitionFilter(),
                GopherQualityFilter(),
                C4QualityFilter(min_num_sentences=min_sentences),
                JsonlWriter(f"{work}/filtered"),
                MinhashDedupSignature(output_folder=f"{work}/signatures", config=config),
            ],
            files,
        ),
        "buckets": (
            [
                MinhashDedupBuckets(
                    input_folder=f"{work}/signatures",
                    output_folder=f"{work}/buckets",
                    config=config,
                )
            ],
            bands,
        ),
        "clusters": (
            [
                MinhashDedupCluster(
                    input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=config
                )
            ],
            1,
        ),
        "drop duplicates": (
            [
                JsonlReader(f"{work}/filtered"),
                MinhashDedupFilter(input_folder=f"{work}/remove"),
                JsonlWriter(f"{work}/deduplicated"),
            ],
            files,
        ),
    }
    seconds = {}
    started = time.time()
    for name, (pipeline, tasks) in stages.items():
        begun = time.time()
        LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=workers,
            logging_dir=f"{work}/logs/{name.replace(' ', '_')}",
            skip_completed=False,
        ).run()
        seconds[name] = round(time.time() - begun, 2)
    kept = sum(1 for path in Path(f"{work}/deduplicated").glob("*.jsonl.gz") for _ in _lines(path))
    documents = sum(1 for path in Path(source).glob("*.jsonl") for _ in path.open())
    print(
        json.dumps(
            {
                "documents": documents,
                "kept": kept,
                "kept_per_stage": _passed_on(f"{work}/logs/filter_+_sign")
                | {"minhash_dedup": kept},
                "seconds": round(time.time() - started, 2),
                "stages": seconds,
            }
        )
    )


def _passed_on(logs: str) -> dict[str, int]:
    """Documents each filter of a stage passed on, from the stats.json datatrove writes."""
    steps = json.loads(Path(logs, "stats.json").read_text())
    passed = {}
    for step in steps:
        stats = step.get("stats", {})
        if "forwarded" in stats:
            passed[step["name"].split(" ", 1)[-1].strip()] = stats["forwarded"]
    return passed


def _lines(path: Path):
    with gzip.open(path, "rt") as handle:
        yield from handle


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(arg) for arg in sys.argv[3:]))
