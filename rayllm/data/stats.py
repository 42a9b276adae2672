"""The curation report: documents and bytes through every block, why each drop happened."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import ray
from rich.table import Table

from rayllm.data.blocks.base import Column
from rayllm.progress import console

EXAMPLES_PER_REASON = 3


class StatsCollector:
    """Aggregates the per-document columns the curation step writes (never the text itself)."""

    def __init__(self, stage_names: list[str], columns: dict[str, Column]):
        self.stage_names = stage_names
        self.columns = columns
        self.stats: dict[str, Any] = {}

    def add_curated(self, curated: ray.data.Dataset) -> None:
        """Streams the per-document columns (never the text): memory holds one batch."""
        columns = ["drop", "stage", "bytes_in", "bytes_out", "bad_bytes", "example", "source"]
        last = len(self.stage_names)
        documents = np.zeros(last + 1, np.int64)  # documents whose last stage reached is i
        sizes = np.zeros(last + 1, np.int64)
        reasons: Counter[str] = Counter()
        examples: dict[str, list[dict[str, str]]] = {}
        summaries = {key: _Summary(column.summary) for key, column in self.columns.items()}
        bytes_out = bad_bytes = 0
        for batch in curated.select_columns(columns + list(summaries)).iter_batches(
            batch_format="numpy", batch_size=8192
        ):
            documents += np.bincount(batch["stage"], minlength=last + 1)
            sizes += np.bincount(
                batch["stage"], weights=batch["bytes_in"], minlength=last + 1
            ).astype(np.int64)
            bytes_out += int(batch["bytes_out"].sum())
            bad_bytes += int(batch["bad_bytes"].sum())
            for key, summary in summaries.items():
                summary.add(batch[key])
            for drop, example, source in zip(
                batch["drop"], batch["example"], batch["source"], strict=True
            ):
                if drop:
                    reasons[str(drop)] += 1
                    kept = examples.setdefault(str(drop), [])
                    if len(kept) < EXAMPLES_PER_REASON:
                        kept.append({"source": str(source), "text": str(example)})
        entering = np.cumsum(documents[::-1])[::-1]  # documents reaching stage i or later
        entering_bytes = np.cumsum(sizes[::-1])[::-1]
        per_stage = [
            {
                "stage": name,
                "documents_in": int(entering[index]),
                "documents_out": int(entering[index + 1]),
                "bytes_in": int(entering_bytes[index]),
            }
            for index, name in enumerate(self.stage_names)
        ]
        self.stats = {
            "documents_in": int(entering[0]),
            "documents_kept": int(documents[last]),
            "bytes_in": int(entering_bytes[0]),
            "bytes_kept": bytes_out,
            "undecodable_bytes": bad_bytes,
            "stages": per_stage,
            "dropped": dict(reasons.most_common()),
            "examples": examples,
            "columns": {key: summary.result() for key, summary in summaries.items()},
        }

    def top_reasons(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in list(self.stats["dropped"].items())[:3])


class _Summary:
    """One block column summarised as it streams past (see ``Column.summary``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.total = 0
        self.values: Counter[str] = Counter()
        self.numbers: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        if self.kind == "sum":
            self.total += int(values.sum())
        elif self.kind == "top":
            self.values.update(str(v) for v in values if v)
        else:
            numbers = values.astype(np.float64)
            self.numbers.append(numbers[~np.isnan(numbers)])

    def result(self) -> Any:
        if self.kind == "sum":
            return self.total
        if self.kind == "top":
            return dict(self.values.most_common(10))
        numbers = np.concatenate(self.numbers) if self.numbers else np.empty(0)
        if not len(numbers):
            return {"documents": 0}
        p10, p50, p90 = np.quantile(numbers, [0.1, 0.5, 0.9])
        return {
            "documents": len(numbers),
            "mean": round(float(numbers.mean()), 4),
            "p10": round(float(p10), 4),
            "median": round(float(p50), 4),
            "p90": round(float(p90), 4),
        }


def print_stats(stats: dict[str, Any]) -> None:
    table = Table(title="curation", title_justify="left")
    for column in ("block", "docs in", "docs out", "dropped", "MB in"):
        table.add_column(column, justify="left" if column == "block" else "right")
    for stage in stats["stages"]:
        dropped = stage["documents_in"] - stage["documents_out"]
        table.add_row(
            stage["stage"],
            f"{stage['documents_in']:,}",
            f"{stage['documents_out']:,}",
            f"{dropped:,}",
            f"{stage['bytes_in'] / 1e6:.2f}",
        )
    if "exact_duplicates" in stats:
        table.add_row("exact dedup", "", "", f"{stats['exact_duplicates']:,}", "")
    if "paragraphs" in stats:
        removed = stats["paragraphs"]["paragraphs_removed"]
        table.add_row(
            "paragraph dedup",
            "",
            "",
            f"{stats['paragraphs']['documents_emptied']:,}",
            f"({removed:,} paragraphs)",
        )
    if "fuzzy" in stats:
        table.add_row("fuzzy dedup", "", "", f"{stats['fuzzy']['fuzzy_removed']:,}", "")
    console.print(table)
    reasons = Table(
        "reason", "documents", "example", title="why documents were dropped", title_justify="left"
    )
    for reason, count in list(stats["dropped"].items())[:12]:
        example = stats["examples"][reason][0]["text"].replace("\n", " ")[:70]
        reasons.add_row(reason, f"{count:,}", example)
    if stats["dropped"]:
        console.print(reasons)
    for key, value in stats["columns"].items():
        if isinstance(value, int):
            if value:
                console.print(f"{key}: {value:,}")
        elif "mean" in value:
            console.print(
                f"{key}: mean {value['mean']:.3f}, p10 {value['p10']:.3f}, "
                f"median {value['median']:.3f}, p90 {value['p90']:.3f} "
                f"over {value['documents']:,} documents"
            )
        elif value and "documents" not in value:
            console.print(f"{key}: " + ", ".join(f"{k} {v:,}" for k, v in value.items()))
