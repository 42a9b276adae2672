"""The whole lifecycle in one run: curate -> train -> evaluate -> publish -> serve -> query."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.table import Table

import rayllm
from rayllm.client import Client
from rayllm.cluster import RayConfig, connect
from rayllm.config import StageConfig
from rayllm.data.dedup import FuzzyDedupConfig, ParagraphDedupConfig
from rayllm.data.filters.c4 import C4Config
from rayllm.data.filters.gopher import GopherQualityConfig, GopherRepetitionConfig
from rayllm.data.filters.language import LanguageConfig
from rayllm.data.pipeline import DataConfig
from rayllm.data.pipeline import run as run_data
from rayllm.eval.perplexity import run_remote as evaluate
from rayllm.paths import absolute_url
from rayllm.progress import Stage, console
from rayllm.registry.store import Registry, RegistryConfig, check_name
from rayllm.serve.app import ServeConfig, deploy
from rayllm.train.config import TrainConfig
from rayllm.train.trainer import run as run_train

QUICKSTART_DATA = DataConfig(
    # Shakespeare's paragraphs are speeches, often a line or two of verse: the Gopher rules are
    # relaxed for them; the repetition rules (meant for documents of 50+ words) and C4's line
    # rules (terminal punctuation would strip verse) are off. Language ID and fuzzy dedup are
    # off to keep the quickstart quick: `rayllm data` runs them all by default.
    language=LanguageConfig(enabled=False),
    gopher_quality=GopherQualityConfig(
        min_words=5,
        min_mean_word_length=2.0,
        max_mean_word_length=12.0,
        min_alpha_words_fraction=0.6,
        min_stop_words=0,
    ),
    gopher_repetition=GopherRepetitionConfig(enabled=False),
    c4=C4Config(enabled=False),
    paragraph_dedup=ParagraphDedupConfig(enabled=False),
    fuzzy_dedup=FuzzyDedupConfig(enabled=False),
)


class LifecycleConfig(StageConfig):
    """One config for the whole run; the stage paths all live under ``workdir``."""

    workdir: str = "rayllm-work"
    model_name: str = "shakespeare"
    ray: RayConfig = RayConfig()
    data: DataConfig = QUICKSTART_DATA
    train: TrainConfig = TrainConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    prompts: list[str] = ["ROMEO.\nBut soft, what light", "KING HENRY.\nOnce more unto the breach,"]
    max_tokens: int = 48

    def wired(self) -> LifecycleConfig:
        """Point each stage at the previous one's output, under ``workdir``."""
        work = absolute_url(self.workdir)
        check_name(self.model_name)
        return self.model_copy(
            update={
                "data": self.data.model_copy(update={"output": f"{work}/data"}),
                "train": self.train.model_copy(
                    update={"data": f"{work}/data", "storage": f"{work}/runs"}
                ),
                "registry": self.registry.model_copy(update={"root": f"{work}/registry"})
                if self.registry.root == RegistryConfig().root
                else self.registry,
                "serve": self.serve.model_copy(update={"model": self.model_name}),
            }
        )


def code_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(rayllm.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except OSError:
        commit = ""
    return f"rayllm {rayllm.__version__}" + (f" ({commit})" if commit else "")


def run(config: LifecycleConfig) -> dict[str, Any]:
    """Run every stage; return the figures the report shows."""
    config = config.wired()
    report: dict[str, Any] = {"started": time.time()}
    connect(config.ray)

    started = time.time()
    manifest = run_data(config.data)
    report["data"] = {"seconds": time.time() - started, **manifest["stats"]}

    work = Path(config.workdir).expanduser().resolve()
    model_dir = work / "model"
    trained = run_train(config.train, model_dir)
    for item in (Path(config.data.output) / "tokenizer").iterdir():
        shutil.copy(item, model_dir / item.name)
    report["train"] = {"seconds": trained.seconds, **trained.metrics}

    with Stage("eval: held-out perplexity") as stage:
        started = time.time()
        scores = evaluate(str(model_dir), config.data.output, manifest["shards"]["val"])
        report["eval"] = {"seconds": time.time() - started, **scores}
        stage.note(f"perplexity {scores['perplexity']:.1f} over {scores['tokens']:,} tokens")

    with Stage("registry: publish") as stage:
        started = time.time()
        registry = Registry(config.registry.root)
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        version = registry.publish(
            config.model_name,
            model_dir,
            lineage={
                "parent": None,
                "data": {
                    "url": config.data.output,
                    "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                },
                "training": config.train.model_dump(mode="json"),
                "checkpoint": trained.checkpoint_path,
                "metrics": {**trained.metrics, **scores},
                "code": code_version(),
            },
        )
        report["registry"] = {
            "seconds": time.time() - started,
            "ref": version.ref,
            "root": registry.url,
        }
        stage.note(f"{version.ref} in {registry.url}")

    started = time.time()
    endpoint = deploy(config.serve.model_copy(update={"model": version.ref}), registry)
    report["serve"] = {"seconds": time.time() - started, **endpoint}

    with Stage("client: completions") as stage:
        started = time.time()
        report["completions"] = _query(endpoint, config)
        report["client"] = {"seconds": time.time() - started}
        stage.note(f"{len(config.prompts)} prompts answered")
    report["seconds"] = time.time() - report.pop("started")
    print_report(report)
    return report


def _query(endpoint: dict[str, Any], config: LifecycleConfig) -> list[dict[str, str]]:
    answers = []
    with Client(endpoint["url"], endpoint["model"]) as client:
        for index, prompt in enumerate(config.prompts):
            console.print(f"\n[bold]{prompt}[/]", end="")
            if index == 0:  # the first one streamed, token by token
                pieces = []
                for piece in client.stream(prompt, max_tokens=config.max_tokens):
                    console.print(piece, end="", markup=False)
                    pieces.append(piece)
                text = "".join(pieces)
            else:
                text = client.complete(prompt, max_tokens=config.max_tokens)
                console.print(text, markup=False, end="")
            console.print()
            answers.append({"prompt": prompt, "completion": text})
    return answers


def print_report(report: dict[str, Any]) -> None:
    data, train, evals = report["data"], report["train"], report["eval"]
    table = Table(title="rayllm quickstart", show_lines=False)
    table.add_column("stage")
    table.add_column("result")
    table.add_column("time", justify="right")
    table.add_row(
        "data",
        f"{data['documents_in']:,} docs in, {data['documents_kept']:,} kept "
        f"({sum(data['dropped'].values()):,} filtered, {data.get('exact_duplicates', 0):,} duplicates); "
        f"{data['tokens']['train']:,} train / {data['tokens']['val']:,} val tokens",
        f"{data['seconds']:.0f} s",
    )
    table.add_row(
        "train",
        f"{train['step']} steps, loss {train['loss']:.3f}, val loss {train.get('val_loss', float('nan')):.3f}, "
        f"{train['tokens_per_s']:,.0f} tokens/s",
        f"{train['seconds']:.0f} s",
    )
    table.add_row(
        "eval", f"held-out perplexity {evals['perplexity']:.1f}", f"{evals['seconds']:.0f} s"
    )
    table.add_row(
        "registry",
        f"{report['registry']['ref']} in {report['registry']['root']}",
        f"{report['registry']['seconds']:.0f} s",
    )
    table.add_row(
        "serve",
        f"{report['serve']['url']}/v1  (model {report['serve']['model']})",
        f"{report['serve']['seconds']:.0f} s",
    )
    table.add_row(
        "client",
        f"{len(report['completions'])} completions, 1 streamed",
        f"{report['client']['seconds']:.0f} s",
    )
    table.add_row("total", "", f"{report['seconds']:.0f} s")
    console.print(table)
