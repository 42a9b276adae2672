"""The whole lifecycle in one run: curate -> train -> evaluate -> publish -> serve -> query.

Each stage is ``run(config) -> Result``; this module only chains the Results: the training
stage reads what the data stage wrote, serving serves the version the registry stage
published. Paths left unset go under ``workdir``; a hand-off the user set to something else
than what the previous stage produced is an error naming the key, never silently replaced.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import model_validator
from rich.table import Table

from rayllm.cluster import RayConfig, connect
from rayllm.config import WORKDIR, StageConfig
from rayllm.data.blocks.c4 import C4Config
from rayllm.data.blocks.gopher import GopherQualityConfig, GopherRepetitionConfig
from rayllm.data.blocks.language import LanguageConfig
from rayllm.data.config import DataConfig, FuzzyDedupConfig, ParagraphDedupConfig
from rayllm.errors import RayllmError
from rayllm.paths import absolute_url, filesystem
from rayllm.progress import Stage, console
from rayllm.registry.store import Registry, RegistryConfig, check_name, split_ref
from rayllm.serve.config import ServeConfig
from rayllm.train.config import TrainConfig

LIFECYCLE_DATA = DataConfig(
    # Shakespeare's paragraphs are speeches, often a line or two of verse: the Gopher rules are
    # relaxed for them; the repetition rules (meant for documents of 50+ words) and C4's line
    # rules (terminal punctuation would strip verse) are off. Language ID and fuzzy dedup are
    # off to keep the run quick: `rayllm data` runs them all by default.
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
    """One config for the whole run: every stage's own config, chained."""

    workdir: str = WORKDIR
    """Where every path a stage leaves unset goes (data/, model/, runs/, registry/)."""
    model_name: str = "shakespeare"
    """The registry name the trained model is published and served under."""
    ray: RayConfig = RayConfig()
    data: DataConfig = LIFECYCLE_DATA
    train: TrainConfig = TrainConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    prompts: list[str] = ["ROMEO.\nBut soft, what light", "KING HENRY.\nOnce more unto the breach,"]
    """Completions asked of the served model; the first one is streamed."""
    chat: str = "Speak of the sea."
    """One user message sent to the chat route."""
    max_tokens: int = 48

    @model_validator(mode="after")
    def _check(self) -> LifecycleConfig:
        check_name(self.model_name)
        return self

    def stages(self) -> tuple[DataConfig, TrainConfig, str, ServeConfig]:
        """Each stage's config with its unset paths under ``workdir`` and its inputs taken from
        the stage before; a conflicting setting is an error that names the key to change."""
        data = self.data.with_work_paths(self.workdir)
        train = self.train.with_work_paths(self.workdir)
        if self.train.data is not None and absolute_url(self.train.data) != absolute_url(
            data.output
        ):
            raise RayllmError(
                f"train.data is {self.train.data!r} but the lifecycle trains on what its data "
                f"stage writes ({data.output}); remove train.data or set data.output instead"
            )
        train = train.model_copy(update={"data": absolute_url(data.output)})
        root = self.registry.root_url(self.workdir)
        if self.serve.registry is not None and absolute_url(self.serve.registry) != root:
            raise RayllmError(
                f"serve.registry is {self.serve.registry!r} but the lifecycle publishes to "
                f"{root}; remove serve.registry or set registry.root instead"
            )
        if self.serve.models:
            raise RayllmError(
                "serve.models is set, but the lifecycle serves the one version it publishes; "
                "remove serve.models (serve several models with `rayllm serve`)"
            )
        if self.serve.model is not None and split_ref(self.serve.model)[0] != self.model_name:
            raise RayllmError(
                f"serve.model is {self.serve.model!r} but the lifecycle serves the version it "
                f"publishes as {self.model_name!r}; remove serve.model or set model_name instead"
            )
        return data, train, root, self.serve.model_copy(update={"registry": root})


@dataclass(frozen=True)
class LifecycleResult:
    """The figures of every stage, as the report shows them (also written as JSON)."""

    data: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    registry: dict[str, Any]
    serve: dict[str, Any]
    completions: list[dict[str, str]]
    chat: dict[str, str]
    seconds: float


def run(config: LifecycleConfig) -> LifecycleResult:
    """Run every stage; print the report and write it to ``<workdir>/lifecycle-report.json``."""
    # The stages' engines load here, not at import: checking a lifecycle config stays instant.
    from rayllm.data.pipeline import run as run_data
    from rayllm.eval.perplexity import run_remote as evaluate
    from rayllm.registry.importers import import_folder
    from rayllm.serve.app import deploy
    from rayllm.train.trainer import run as run_train

    data_config, train_config, registry_root, serve_config = config.stages()
    started = time.time()
    connect(config.ray)

    data = run_data(data_config)
    trained = run_train(train_config.model_copy(update={"data": data.output}))

    with Stage("eval: held-out perplexity") as stage:
        eval_started = time.time()
        scores = evaluate(registry_root, trained.model, data.output)
        stage.note(f"perplexity {scores['perplexity']:.1f} over {scores['tokens']:,} tokens")
    eval_seconds = time.time() - eval_started

    with Stage("registry: publish") as stage:
        publish_started = time.time()
        version = import_folder(
            Registry(registry_root), config.model_name, trained.model, metrics=scores
        )
        stage.note(f"{version.ref} in {registry_root}")
    publish_seconds = time.time() - publish_started

    serve_started = time.time()
    endpoint = deploy(serve_config.model_copy(update={"model": version.ref}))
    serve_seconds = time.time() - serve_started

    with Stage("client: completions and chat") as stage:
        client_started = time.time()
        completions, chat = _query(endpoint.url, config.model_name, config)
        stage.note(f"{len(completions)} completions and 1 chat reply")

    result = LifecycleResult(
        data={"seconds": data.seconds, "output": data.output, **data.stats},
        train={"seconds": trained.seconds, "model": trained.model, **trained.metrics},
        eval={"seconds": eval_seconds, **scores},
        registry={"seconds": publish_seconds, "ref": version.ref, "root": registry_root},
        serve={"seconds": serve_seconds, **asdict(endpoint)},
        completions=completions,
        chat=chat,
        seconds=time.time() - started,
    )
    client_seconds = time.time() - client_started
    print_report(result, client_seconds)
    fs, path = filesystem(config.workdir)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/lifecycle-report.json", json.dumps(asdict(result), indent=2).encode())
    return result


def _query(
    url: str, model: str, config: LifecycleConfig
) -> tuple[list[dict[str, str]], dict[str, str]]:
    from rayllm.client import Client

    answers = []
    with Client(url, model) as client:
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
        reply = client.chat([{"role": "user", "content": config.chat}], config.max_tokens)
        console.print(f"\n[bold]user:[/] {config.chat}\n[bold]assistant:[/] ", end="")
        console.print(reply, markup=False)
    return answers, {"user": config.chat, "assistant": reply}


def print_report(result: LifecycleResult, client_seconds: float) -> None:
    data, train, evals = result.data, result.train, result.eval
    table = Table(title="rayllm lifecycle", show_lines=False)
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
        f"{result.registry['ref']} in {result.registry['root']}",
        f"{result.registry['seconds']:.0f} s",
    )
    table.add_row(
        "serve",
        f"{result.serve['url']}/v1  ({', '.join(result.serve['models'])})",
        f"{result.serve['seconds']:.0f} s",
    )
    table.add_row(
        "client",
        f"{len(result.completions)} completions (1 streamed), 1 chat reply",
        f"{client_seconds:.0f} s",
    )
    table.add_row("total", "", f"{result.seconds:.0f} s")
    console.print(table)
