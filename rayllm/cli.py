"""The ``rayllm`` command: one verb per lifecycle stage, plus the whole lifecycle.

Every verb takes ``--config FILE.yaml`` and ``--set key=value`` overrides of its stage config.
User errors print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from rayllm.config import dump_config, load_config
from rayllm.errors import RayllmError
from rayllm.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
registry_app = typer.Typer(no_args_is_help=True, help="List, inspect and alias registry versions.")
app.add_typer(registry_app, name="registry")

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]  # noqa: UP045
SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--set", "-s", help="Override one setting, e.g. train.steps=50 (repeatable)."),
]
RootOption = Annotated[str, typer.Option("--root", help="Registry root (any fsspec URL).")]


@app.command()
def quickstart(config: ConfigOption = None, set: SetOption = None) -> None:
    """Curate Shakespeare, pretrain with ZeRO-2 on 2 workers, publish, serve, and query it."""
    from rayllm.lifecycle import LifecycleConfig, run

    run(load_config(LifecycleConfig, config, set or ()))


@app.command()
def data(config: ConfigOption = None, set: SetOption = None) -> None:
    """Curate a corpus into a tokenizer and packed token shards."""
    from rayllm.cluster import RayConfig, connect
    from rayllm.data.corpora import resolve_source
    from rayllm.data.pipeline import DataConfig, run

    settings = load_config(DataConfig, config, set or ())
    resolve_source(settings.corpus)  # a bad corpus fails before Ray starts
    connect(RayConfig())
    manifest = run(settings)
    console.print_json(json.dumps(manifest["stats"]))


@app.command()
def train(
    config: ConfigOption = None,
    set: SetOption = None,
    output: Annotated[
        Path, typer.Option(help="Where to write the Hugging Face-format model.")
    ] = Path("rayllm-work/model"),
) -> None:
    """Pretrain on finished token shards with Ray Train (ZeRO or DDP)."""
    from rayllm.cluster import RayConfig, connect
    from rayllm.data.pipeline import load_manifest
    from rayllm.paths import absolute_url
    from rayllm.train.config import TrainConfig
    from rayllm.train.trainer import run

    settings = load_config(TrainConfig, config, set or ())
    load_manifest(absolute_url(settings.data))  # missing shards fail before Ray starts
    connect(RayConfig())
    result = run(settings, output)
    console.print(f"model written to {result.hf_model}")


@app.command()
def serve(
    config: ConfigOption = None, set: SetOption = None, root: RootOption = "rayllm-work/registry"
) -> None:
    """Serve a registry version behind OpenAI routes until interrupted."""
    import time

    from rayllm.cluster import RayConfig, connect
    from rayllm.registry.store import Registry
    from rayllm.serve.app import ServeConfig, deploy

    settings = load_config(ServeConfig, config, set or ())
    registry = Registry(root)
    registry.resolve(settings.model)  # a bad reference fails before Ray starts
    connect(RayConfig())
    endpoint = deploy(settings, registry)
    console.print(f"serving {endpoint['model']} at {endpoint['url']}/v1; Ctrl-C to stop")
    while True:
        time.sleep(3600)


@app.command()
def complete(
    prompt: str,
    url: Annotated[str, typer.Option(help="Endpoint base URL.")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="Served model id.")] = "shakespeare",
    max_tokens: int = 64,
) -> None:
    """Stream one completion from a running endpoint."""
    from rayllm.client import Client

    with Client(url, model) as client:
        for piece in client.stream(prompt, max_tokens=max_tokens):
            console.print(piece, end="", markup=False)
    console.print()


@app.command("config")
def show_config(
    stage: Annotated[str, typer.Argument(help="quickstart | data | train | serve")] = "quickstart",
) -> None:
    """Print a stage's full default config as YAML (a starting point to copy)."""
    from rayllm.data.pipeline import DataConfig
    from rayllm.lifecycle import LifecycleConfig
    from rayllm.serve.app import ServeConfig
    from rayllm.train.config import TrainConfig

    stages = {
        "quickstart": LifecycleConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "serve": ServeConfig,
    }
    if stage not in stages:
        raise RayllmError(f"unknown stage {stage!r}; choose one of {', '.join(stages)}")
    print(dump_config(stages[stage]()), end="")


@registry_app.command("list")
def registry_list(root: RootOption = "rayllm-work/registry") -> None:
    """Models, their versions and aliases."""
    from rich.table import Table

    from rayllm.registry.store import Registry

    registry = Registry(root)
    table = Table("model", "versions", "aliases")
    for name in registry.models():
        aliases = ", ".join(f"{a}->{v}" for a, v in registry.aliases(name).items())
        table.add_row(name, ", ".join(map(str, registry.versions(name))), aliases)
    console.print(table)


@registry_app.command("show")
def registry_show(ref: str, root: RootOption = "rayllm-work/registry") -> None:
    """The manifest of one version (files, checksums, lineage) as JSON."""
    from rayllm.registry.store import Registry

    console.print_json(json.dumps(Registry(root).resolve(ref).manifest))


@registry_app.command("alias")
def registry_alias(
    name: str, alias: str, version: int, reason: str = "", root: RootOption = "rayllm-work/registry"
) -> None:
    """Point ALIAS of model NAME at VERSION."""
    from rayllm.registry.store import Registry

    Registry(root).set_alias(name, alias, version, reason)
    console.print(f"{name}@{alias} -> {version}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except RayllmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as err:  # a bad flag or argument
        err.show()
        sys.exit(2)


if __name__ == "__main__":
    main()
