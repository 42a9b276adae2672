"""The ``rayllm`` command: one verb per lifecycle stage, plus the whole lifecycle.

Every verb takes ``--config FILE.yaml`` and ``--set key=value`` overrides of its stage config.
User errors print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from rayllm.config import dump_config, dump_yaml, load_config
from rayllm.errors import RayllmError
from rayllm.paths import check_replaceable
from rayllm.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
registry_app = typer.Typer(no_args_is_help=True, help="List, inspect and alias registry versions.")
app.add_typer(registry_app, name="registry")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks and quality measurements.")
app.add_typer(bench_app, name="bench")
serve_app = typer.Typer(invoke_without_command=True)
app.add_typer(serve_app, name="serve")
k8s_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests for Kubernetes clusters.")
app.add_typer(k8s_app, name="k8s")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one setting, e.g. train.steps=50 (repeatable)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
RootOption = Annotated[
    str | None,
    typer.Option(
        "--root",
        help="Registry root, any fsspec URL [default: $RAYLLM_REGISTRY or rayllm-work/registry].",
    ),
]


@app.command()
def lifecycle(config: ConfigOption = None, set: SetOption = None) -> None:
    """Curate Shakespeare, pretrain with ZeRO-2 on 2 workers, publish, serve, and query it."""
    from rayllm.lifecycle import LifecycleConfig, run

    settings = load_config(LifecycleConfig, config, set or ())
    settings.stages()  # conflicting hand-offs fail before Ray starts
    run(settings)


@app.command()
def data(config: ConfigOption = None, set: SetOption = None) -> None:
    """Curate a corpus into a tokenizer and packed token shards."""
    from rayllm.data.config import DataConfig
    from rayllm.data.corpora import resolve_source

    settings = load_config(DataConfig, config, set or ()).with_work_paths()
    resolve_source(settings.corpus)  # a bad corpus or output fails before Ray starts
    check_replaceable(settings.output, settings.overwrite, "data.output", "output")
    from rayllm.cluster import RayConfig, connect
    from rayllm.data.pipeline import run

    connect(RayConfig())
    result = run(settings)
    console.print(f"shards, tokenizer and stats.json written to {result.output}")


@app.command()
def train(config: ConfigOption = None, set: SetOption = None) -> None:
    """Pretrain on finished token shards with Ray Train (DDP, FSDP2, TP, PP or ZeRO)."""
    from rayllm.train.config import TrainConfig
    from rayllm.train.preflight import preflight

    settings = load_config(TrainConfig, config, set or ())
    checked = preflight(settings)  # a bad layout, shards or output fail before Ray starts
    from rayllm.cluster import RayConfig, connect
    from rayllm.train.trainer import run

    connect(RayConfig())
    result = run(settings, checked)
    console.print(f"model written to {result.model}")


@app.command()
def finetune(config: ConfigOption = None, set: SetOption = None) -> None:
    """Fine-tune a registry version with Ray Train, supervised on chat data or by DPO on
    preference pairs, LoRA or full; the result is published with the base as its parent."""
    from rayllm.finetune.config import FinetuneConfig
    from rayllm.finetune.examples import read_conversations, read_preferences

    settings = load_config(FinetuneConfig, config, set or ())
    settings.base_version()  # a missing base, an adapter or bad data fail before Ray starts
    (read_preferences if settings.objective == "dpo" else read_conversations)(settings.data)
    from rayllm.cluster import RayConfig, connect
    from rayllm.finetune.trainer import run

    connect(RayConfig())
    result = run(settings)
    console.print(
        f"published {result.version} ({result.trainable_parameters:,} trainable parameters)"
    )


@app.command()
def compress(config: ConfigOption = None, set: SetOption = None) -> None:
    """Compress a registry version (quantize: GPTQ or round-to-nearest, int4 or int8; prune:
    weights, heads, MLP channels or layers; distill: a smaller student trained against it on
    Ray Train) on the shard set's text, and publish the result with its size and held-out loss
    before and after, the source as its parent."""
    from rayllm.compress.config import CompressConfig

    settings = load_config(CompressConfig, config, set or ()).with_work_paths()
    settings.check_inputs()  # a missing or unfit source, or no shards, fail before Ray starts
    from rayllm.cluster import RayConfig, connect
    from rayllm.compress.runner import run

    connect(RayConfig())
    result = run(settings)
    console.print(
        f"published {result.version}: {result.bytes_after / 2**20:.1f} MiB of weights "
        f"(from {result.bytes_before / 2**20:.1f}), held-out loss {result.loss_after:.4f} "
        f"(from {result.loss_before:.4f}), in {result.seconds:.0f} s"
    )


@app.command("eval")
def evaluate(config: ConfigOption = None, set: SetOption = None) -> None:
    """Score a registry version (or a model folder): held-out perplexity, question answering
    (exact match, F1, BLEU, ROUGE-L; few-shot or chain of thought), refusals. A version's
    results are stored in its manifest, for the promotion gate."""
    from rayllm.data.shards import load_manifest
    from rayllm.eval.config import EvalConfig

    settings = load_config(EvalConfig, config, set or ()).with_work_paths()
    if "perplexity" in settings.tasks:  # missing shards or model fail before Ray starts
        load_manifest(settings.data)
    version = settings.version()
    from rayllm.cluster import RayConfig, connect
    from rayllm.eval.suite import run

    connect(RayConfig())
    results = run(settings)
    name = version.ref if version else settings.model
    for key, scores in results.items():
        console.print(f"{name}: {describe_scores(key, scores)}")
    if version and settings.record:
        console.print(f"results recorded in {version.ref}'s manifest")


def describe_scores(key: str, scores: dict) -> str:
    if key == "perplexity":
        return (
            f"held-out perplexity {scores['perplexity']:.2f} (loss {scores['val_loss']:.4f}) "
            f"over {scores['tokens']:,} tokens of {scores['data']}"
        )
    if key == "harness":
        return (
            f"lm-evaluation-harness ({scores['harness']}): exact match "
            f"{scores['exact_match']:.3f} over {scores['examples']} held-out questions"
        )
    if key == "safety":
        return (
            f"safety: refusal rate {scores['refusal_rate']:.2f}, over-refusal rate "
            f"{scores['over_refusal_rate']:.2f} over {scores['examples']} prompts"
        )
    return (
        f"{key}: exact match {scores['exact_match']:.3f}, F1 {scores['f1']:.3f}, "
        f"BLEU {scores['bleu']:.2f}, ROUGE-L {scores['rouge_l']:.3f} "
        f"over {scores['examples']} held-out questions"
    )


ExportOption = Annotated[
    Path | None,
    typer.Option(
        "--export-config",
        help="Write the Serve config file of this app (for `serve deploy` or a RayService's "
        "serveConfigV2), every model pinned to its version, instead of serving; - for stdout.",
    ),
]


@serve_app.callback()
def serve(
    context: typer.Context,
    config: ConfigOption = None,
    set: SetOption = None,
    export: ExportOption = None,
) -> None:
    """Serve registry versions behind OpenAI routes until interrupted (Ctrl-C, or SIGTERM
    from `ray job stop`, removes the app); `rayllm serve rollout` moves a running app onto
    newly promoted versions."""
    if context.invoked_subcommand is not None:
        if config or set or export:
            raise RayllmError(
                f"--config, --set and --export-config belong to `rayllm serve` itself, not to "
                f"`rayllm serve {context.invoked_subcommand}`; drop them"
            )
        return
    import time

    from rayllm.serve.app import api_key_digests, pin, serve_config_file
    from rayllm.serve.config import ServeConfig

    settings = pin(load_config(ServeConfig, config, set or ()))  # unknown versions fail here
    if export is not None:  # the app is built, and its keys read, where the file is deployed
        text = dump_yaml(serve_config_file(settings))
        if str(export) == "-":
            print(text, end="")
        else:
            export.write_text(text)
            console.print(
                f"Serve config written to {export}; deploy it with `serve deploy {export}`"
            )
        return
    api_key_digests(settings)  # so are missing keys
    from rayllm.cluster import RayConfig, connect
    from rayllm.serve.app import deploy, shutdown

    connect(RayConfig())
    endpoint = deploy(settings)
    served = ", ".join(f"{ref} as {name}" for name, ref in endpoint.models.items())
    console.print(f"serving {served} at {endpoint.url}/v1; Ctrl-C to stop")
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`, a pod's shutdown
    try:
        while True:  # Python runs signal handlers in the main thread once it wakes, and a
            time.sleep(1)  # signal one of Ray's threads receives does not wake it
    except KeyboardInterrupt:
        shutdown(settings)
        console.print(f"stopped serving {served}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


AppOption = Annotated[str, typer.Option("--app", help="The running Serve app's name.")]


def _running_cluster() -> None:
    """Join the cluster the app runs on ($RAY_ADDRESS, else the one on this machine); never
    start a new one."""
    import os

    from rayllm.cluster import RayConfig, connect

    connect(RayConfig(address=os.environ.get("RAY_ADDRESS") or "auto"))


@serve_app.command("rollout")
def serve_rollout(
    app_name: AppOption = "rayllm",
    follow: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="MODEL_ID=REFERENCE: serve that model from another reference from now on, "
            "e.g. shakespeare=shakespeare@production (repeatable).",
        ),
    ] = None,
) -> None:
    """Move a running app onto the versions its references name now, after a promote or a
    rollback in the registry; old replicas serve until their replacements are ready."""
    from rayllm.serve.rollout import rollout

    pairs = [item.partition("=") for item in follow or ()]
    if any(not (model_id and sep and ref) for model_id, sep, ref in pairs):
        raise RayllmError(
            "--model takes MODEL_ID=REFERENCE, e.g. shakespeare=shakespeare@production"
        )
    _running_cluster()
    done = rollout(app_name, {model_id: ref for model_id, _, ref in pairs})
    for model_id, (old, new) in done.changes.items():
        console.print(f"{model_id}: {old} -> {new} (follows {done.follows[model_id]})")
    following = ", ".join(f"{m} follows {ref}" for m, ref in done.follows.items())
    if not done.needed:
        console.print(f"app {app_name} already serves what its references name ({following})")
    else:
        console.print(f"app {app_name} rolled out in {done.seconds:.0f} s ({following})")


@serve_app.command("status")
def serve_status(
    app_name: Annotated[str | None, typer.Option("--app", help="Only this app.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Each Serve app on the cluster: its models, the registry versions they serve, their
    replicas, and their traffic (requests by status code, time to first token, tokens)."""
    from dataclasses import asdict

    from rich.table import Table

    from rayllm.serve.status import serve_status

    _running_cluster()
    apps = serve_status(app_name)
    if app_name is not None and not apps:
        raise RayllmError(f"no Serve app named {app_name!r} runs on this cluster")
    table = Table("app", "model", "follows", "version", "replicas", "TTFT", "tokens", "requests")
    for app in apps:
        requests = ", ".join(f"{code}: {n:.0f}" for code, n in sorted(app.requests.items()))
        if app.message:
            requests += f"  {app.message}"
        for model in app.models or [None]:
            if model is None:
                table.add_row(app.name, "", "", "", app.status, "", "", requests)
                continue
            replicas = ", ".join(f"{n} {state}" for state, n in model.replicas.items() if n)
            ttft = f"{model.ttft_s * 1000:.0f} ms" if model.ttft_s is not None else ""
            table.add_row(
                f"{app.name} ({app.status})", model.model_id, model.follows, model.version,
                replicas or model.status, ttft, f"{model.generated_tokens:.0f}", requests,
            )  # fmt: skip
    _emit(as_json, [asdict(app) for app in apps], table)


UrlOption = Annotated[str, typer.Option(help="Endpoint base URL.")]
ModelOption = Annotated[str, typer.Option(help="Served model id.")]


@app.command()
def batch(config: ConfigOption = None, set: SetOption = None) -> None:
    """Complete every prompt of a dataset (JSON lines or Parquet) with a registry version on
    Ray Data, into Parquet."""
    from rayllm.registry.store import Registry
    from rayllm.serve.config import BatchConfig

    settings = load_config(BatchConfig, config, set or ())
    settings.check_given()  # a missing setting, model or output fails before Ray starts
    Registry(settings.registry_root()).resolve(settings.model)
    check_replaceable(settings.output, settings.overwrite, "batch.output", "output")
    from rayllm.cluster import RayConfig, connect
    from rayllm.serve.batch import run

    connect(RayConfig())
    result = run(settings)
    console.print(
        f"{result.rows} completions ({result.output_tokens} tokens) by {result.version} "
        f"written to {result.output}"
    )


@app.command()
def complete(
    prompt: str,
    url: UrlOption = "http://127.0.0.1:8000",
    model: ModelOption = "shakespeare",
    max_tokens: int = 64,
) -> None:
    """Stream one completion from a running endpoint (API key: $RAYLLM_API_KEY)."""
    from rayllm.client import Client

    with Client(url, model) as client:
        for piece in client.stream(prompt, max_tokens=max_tokens):
            console.print(piece, end="", markup=False)
    console.print()


@app.command()
def chat(
    message: str,
    url: UrlOption = "http://127.0.0.1:8000",
    model: ModelOption = "shakespeare",
    system: Annotated[str | None, typer.Option(help="A system message first.")] = None,
    max_tokens: int = 64,
) -> None:
    """Send one user message to the chat route and stream the reply (API key:
    $RAYLLM_API_KEY)."""
    from rayllm.client import Client

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}
    ]
    with Client(url, model) as client:
        for piece in client.chat_stream(messages, max_tokens=max_tokens):
            console.print(piece, end="", markup=False)
    console.print()


@k8s_app.command("render")
def k8s_render(
    config: ConfigOption = None,
    set: SetOption = None,
    out: Annotated[Path, typer.Option("--out", help="Folder the manifests go to.")] = Path("k8s"),
) -> None:
    """Write the RayCluster, a RayJob per job, the RayService and the volume claim that a
    deployment config describes (`rayllm config k8s` lists its settings); run it from the
    checkout the image is built from."""
    from rayllm.k8s import K8sConfig, render, write

    settings = load_config(K8sConfig, config, set or ())
    files = render(settings, Path.cwd())
    for path in write(files, out, f" --config {config}" if config else ""):
        console.print(f"wrote {path}")


@app.command("config")
def show_config(
    stage: Annotated[
        str,
        typer.Argument(
            help="lifecycle | data | train | finetune | compress | eval | serve | batch | k8s"
        ),
    ] = "lifecycle",
    config: ConfigOption = None,
    set: SetOption = None,
) -> None:
    """Print a stage's full config as YAML: its defaults, or a recipe (--config) with its
    overrides applied and checked, as the stage would run it."""
    from rayllm.compress.config import CompressConfig
    from rayllm.data.config import DataConfig
    from rayllm.eval.config import EvalConfig
    from rayllm.finetune.config import FinetuneConfig
    from rayllm.k8s import K8sConfig
    from rayllm.lifecycle import LifecycleConfig
    from rayllm.serve.config import BatchConfig, ServeConfig
    from rayllm.train.config import TrainConfig

    stages = {
        "lifecycle": LifecycleConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "finetune": FinetuneConfig,
        "compress": CompressConfig,
        "eval": EvalConfig,
        "serve": ServeConfig,
        "batch": BatchConfig,
        "k8s": K8sConfig,
    }
    if stage not in stages:
        raise RayllmError(f"unknown stage {stage!r}; choose one of {', '.join(stages)}")
    settings = load_config(stages[stage], config, set or ())
    if isinstance(settings, LifecycleConfig):
        settings.stages()  # conflicting hand-offs are errors here too
    print(dump_config(settings), end="")


def _registry(root: str | None):
    from rayllm.registry.store import Registry, default_registry

    return Registry(root or default_registry())


def _emit(as_json: bool, payload: object, table=None) -> None:
    if as_json or table is None:  # the real stdout: main sends all else to stderr with --json
        print(json.dumps(payload, indent=2, default=str), file=sys.__stdout__, flush=True)
    else:
        console.print(table)


@registry_app.command("list")
def registry_list(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Models, their versions and aliases."""
    from rich.table import Table

    registry = _registry(root)
    rows = [
        {"model": name, "versions": registry.versions(name), "aliases": registry.aliases(name)}
        for name in registry.models()
    ]
    table = Table("model", "versions", "aliases")
    for row in rows:
        aliases = ", ".join(f"{a}->{v}" for a, v in row["aliases"].items())
        table.add_row(row["model"], ", ".join(map(str, row["versions"])), aliases)
    _emit(as_json, rows, table)


@registry_app.command("show")
def registry_show(ref: str, root: RootOption = None, as_json: JsonOption = False) -> None:
    """One version: files, checksums, lineage, metrics."""
    from rich.table import Table

    version = _registry(root).resolve(ref)
    manifest = version.manifest
    table = Table("field", "value", title=version.ref, show_header=False)
    table.add_row("created", f"{manifest['created']} by {manifest.get('created_by', '?')}")
    for key, value in manifest["lineage"].items():
        table.add_row(key, json.dumps(value, default=str)[:200])
    for entry in manifest["files"]:
        table.add_row(entry["path"], f"{entry['size']:,} bytes  sha256 {entry['sha256'][:16]}...")
    _emit(as_json, manifest, table)


@registry_app.command("publish")
def registry_publish(
    name: str,
    folder: Path,
    parent: Annotated[
        str | None,
        typer.Option(help="Registry reference of the parent model (an adapter's base: required)."),
    ] = None,
    root: RootOption = None,
) -> None:
    """Publish a Hugging Face-format folder, or a peft adapter of --parent, as the next
    version of NAME."""
    from rayllm.registry.importers import import_folder

    version = import_folder(_registry(root), name, folder, parent=parent)
    console.print(f"published {version.ref}")


@registry_app.command("merge")
def registry_merge(
    adapter: Annotated[
        str, typer.Argument(help="A LoRA adapter version (name, name:N, name@alias).")
    ],
    name: Annotated[str, typer.Argument(help="The model the merged weights publish to.")],
    root: RootOption = None,
) -> None:
    """Publish a LoRA adapter merged into its base as the next full version of NAME (the
    base's dtype and tokenizer; the adapter as its parent)."""
    from rayllm.registry.merge import publish_merged

    version, check = publish_merged(_registry(root), adapter, name)
    console.print(
        f"published {version.ref}: {version.lineage['parent']} merged into "
        f"{version.lineage['source']['base']} ({check['dtype']}), next-token agreement with the "
        f"adapter {check['top1_agreement']:.0%}, largest logit difference "
        f"{check['max_logit_difference']:.3g}"
    )


@registry_app.command("import")
def registry_import(
    name: str,
    source: Annotated[
        str, typer.Argument(help="A .gguf file, a Hugging Face folder, or 'smollm2'.")
    ],
    dtype: Annotated[str, typer.Option(help="Weights dtype for GGUF imports.")] = "bfloat16",
    root: RootOption = None,
) -> None:
    """Import a model from outside: GGUF (dequantised by transformers) or a Hugging Face folder."""
    from rayllm.registry.importers import SMOLLM2, import_folder, import_gguf

    registry = _registry(root)
    if source == SMOLLM2 or source.endswith(".gguf"):
        version = import_gguf(registry, name, source, dtype=dtype)
    else:
        version = import_folder(registry, name, source)
    console.print(f"imported {version.ref}")


@registry_app.command("export")
def registry_export(
    ref: str,
    destination: Path,
    gguf: Annotated[
        str | None,
        typer.Option(
            help="Write one GGUF file (q8_0, f16 or f32 matrices) instead of the folder, "
            "checked by loading it back with transformers."
        ),
    ] = None,
    root: RootOption = None,
) -> None:
    """Copy a verified version to a local folder, or write it as a GGUF file."""
    if gguf is None:
        version = _registry(root).export(ref, destination)
        console.print(f"exported {version.ref} to {destination}")
        return
    from rayllm.compress.gguf import export_gguf

    check = export_gguf(_registry(root), ref, destination, gguf)
    console.print(
        f"exported {check['version']} to {destination} ({gguf}, {check['bytes'] / 2**20:.1f} "
        f"MiB): loaded back with the same tokens, next-token agreement "
        f"{check['top1_agreement']:.0%}, largest logit difference "
        f"{check['max_logit_difference']:.3g}"
    )


@registry_app.command("promote")
def registry_promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to point the alias at.")],
    alias: str,
    reason: Annotated[str, typer.Option(help="Why, for the alias history.")] = "",
    force: Annotated[
        bool, typer.Option(help="Promote although the alias's gate fails (needs --reason).")
    ] = False,
    root: RootOption = None,
) -> None:
    """Point ALIAS at a version (e.g. promote shakespeare:3 production); refused when the
    version's recorded evaluations miss the alias's gate, unless forced with a reason."""
    registry = _registry(root)
    version = registry.resolve(ref)
    previous = registry.set_alias(version.name, alias, version.version, reason, forced=force)
    console.print(f"{version.name}@{alias}: {previous} -> {version.version}")


@registry_app.command("gate")
def registry_gate(
    name: str,
    alias: str,
    minimum: Annotated[
        list[str] | None,
        typer.Option("--min", help="TASK.SCORE=VALUE a version must reach, e.g. qa.f1=0.3."),
    ] = None,
    maximum: Annotated[
        list[str] | None,
        typer.Option("--max", help="TASK.SCORE=VALUE a version must stay under."),
    ] = None,
    root: RootOption = None,
) -> None:
    """Set what a version of NAME must score (as `rayllm eval` records it) to be promoted to
    ALIAS; with no --min or --max, remove the gate."""
    thresholds: dict[str, dict[str, float]] = {}
    for bound, given in (("min", minimum or []), ("max", maximum or [])):
        for text in given:
            metric, sep, value = text.partition("=")
            try:
                thresholds.setdefault(metric, {})[bound] = float(value)
            except ValueError:
                raise RayllmError(
                    f"--{bound} {text!r} is not TASK.SCORE=NUMBER (e.g. qa.f1=0.3)"
                ) from None
    _registry(root).set_gate(name, alias, thresholds)
    shown = ", ".join(f"{m} {b}" for m, b in thresholds.items()) or "no gate"
    console.print(f"{name}@{alias}: {shown}")


@registry_app.command("rollback")
def registry_rollback(name: str, alias: str, reason: str = "", root: RootOption = None) -> None:
    """Point ALIAS back at the version it pointed at before its last move."""
    target = _registry(root).rollback(name, alias, reason)
    console.print(f"{name}@{alias} -> {target}")


@registry_app.command("history")
def registry_history(name: str, root: RootOption = None, as_json: JsonOption = False) -> None:
    """Every alias move of NAME: who, when, why."""
    from rich.table import Table

    history = _registry(root).alias_state(name)["history"]
    table = Table("alias", "from", "to", "by", "at", "reason")
    for move in history:
        if "gate" in move:
            move = move | {"from": "", "to": f"gate {move['gate'] or 'removed'}"}
        row = ("alias", "from", "to", "by", "at", "reason")
        table.add_row(*(str(move.get(k, "")) for k in row))
    _emit(as_json, history, table)


@registry_app.command("lineage")
def registry_lineage(ref: str, root: RootOption = None, as_json: JsonOption = False) -> None:
    """Walk a version's ancestry: itself, its parent, the parent's parent..."""
    from rich.table import Table

    chain = _registry(root).lineage(ref)
    rows = [
        {
            "ref": v.ref,
            "created": v.manifest["created"],
            "source": v.lineage.get("source") or v.lineage.get("data"),
            "metrics": v.lineage.get("metrics"),
        }
        for v in chain
    ]
    table = Table("version", "created", "from", "metrics")
    for row in rows:
        metrics = ", ".join(
            f"{k} {v:.3g}" for k, v in (row["metrics"] or {}).items() if k in ("loss", "perplexity")
        )
        table.add_row(
            row["ref"], row["created"], json.dumps(row["source"], default=str)[:80], metrics
        )
    _emit(as_json, rows, table)


@registry_app.command("verify")
def registry_verify(ref: str, root: RootOption = None) -> None:
    """Check every file of a version against its size and sha256."""
    registry = _registry(root)
    version = registry.resolve(ref)
    registry.verify(version)
    console.print(f"{version.ref}: {len(version.manifest['files'])} files verified")


@registry_app.command("gc")
def registry_gc(
    older_than: Annotated[
        float, typer.Option(help="Only leftovers untouched this many seconds.")
    ] = 3600,
    root: RootOption = None,
) -> None:
    """Remove what crashed publishes left behind (versions without a manifest)."""
    removed = _registry(root).gc(older_than)
    console.print(
        f"removed {len(removed)} incomplete versions"
        + (f": {', '.join(removed)}" if removed else "")
    )


@bench_app.command("dedup")
def bench_dedup(set: SetOption = None, as_json: JsonOption = False) -> None:
    """Precision and recall of fuzzy dedup on the Shakespeare modern / First Folio pairs."""
    from rayllm.bench.data import dedup_quality
    from rayllm.cluster import RayConfig, connect
    from rayllm.data.config import FuzzyDedupConfig

    settings = load_config(FuzzyDedupConfig, None, set or ())
    connect(RayConfig())
    result = dedup_quality(settings)
    if as_json:
        _emit(as_json, result)
        return
    console.print(
        f"fuzzy dedup on {result['documents']} Shakespeare files ({result['true_pairs']} true pairs): "
        f"precision {result['precision']:.3f}, recall {result['recall']:.3f} "
        f"({result['predicted_pairs']} pairs predicted, {result['seconds']} s)"
    )
    if result["missed"]:
        console.print(f"missed: {', '.join(result['missed'])}")
    if result["false_pairs"]:
        console.print(f"wrongly merged: {result['false_pairs']}")


@bench_app.command("data")
def bench_data(
    corpus: str = "bible",
    copies: Annotated[
        int, typer.Option(help="Corpus copies, each a near-duplicate (13 Bibles: 54 MB).")
    ] = 13,
    workers: Annotated[
        list[int] | None, typer.Option(help="Worker counts (CPUs for both systems; repeatable).")
    ] = None,
    datatrove: Annotated[
        bool, typer.Option(help="Run datatrove too (its environment: make bench-setup).")
    ] = True,
    setting: Annotated[
        list[str] | None,
        typer.Option(help="Only these MinHash settings (repeatable) [default: both systems']."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Gopher + C4 filters and MinHash dedup: rayllm against datatrove, same input, same CPUs,
    each at its own defaults and at the other's."""
    from rich.table import Table

    from rayllm.bench.data import throughput

    results = throughput(corpus, copies, workers or [2], datatrove, setting)
    table = Table(
        "system",
        "MinHash setting",
        "workers",
        "MB",
        "kept",
        "seconds",
        "MB/s",
        "vs datatrove",
        "rayllm without tokenizer + packing",
        title=f"filters + MinHash dedup of {corpus} x {copies}",
    )
    baseline = {(r["workers"], r["setting"]): r for r in results if r["system"] == "datatrove"}
    for row in results:
        other = baseline.get((row["workers"], row["setting"]))
        table.add_row(
            row["system"],
            row["setting"],
            str(row["workers"]),
            f"{row['megabytes']:.1f}",
            f"{row['kept']:,}",
            f"{row['seconds']:.1f}",
            f"{row['mb_per_s']:.3f}",
            f"{other['seconds'] / row['seconds']:.2f}x" if other else "-",
            f"{row['seconds_without_tokenizer_and_packing']:.1f} s"
            if "seconds_without_tokenizer_and_packing" in row
            else "",
        )
    _emit(as_json, results, table)


@bench_app.command("memory")
def bench_memory(
    corpus: str = "bible",
    copies: Annotated[
        list[int] | None, typer.Option(help="Corpus sizes, in copies of the corpus (repeatable).")
    ] = None,
    workers: int = 2,
    block_mb: Annotated[
        int, typer.Option(help="data.block_mb: small, so that the corpus outgrows a block.")
    ] = 2,
    dedup: Annotated[bool, typer.Option(help="Include the three dedup steps.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Peak memory of the whole curation pipeline as the corpus grows."""
    from rich.table import Table

    from rayllm.bench.data import memory_scaling
    from rayllm.cluster import RayConfig, connect

    connect(RayConfig())
    results = memory_scaling(corpus, copies or [1, 4], workers, block_mb, dedup)
    table = Table(
        "copies",
        "documents",
        "MB",
        "seconds",
        "driver peak MB",
        "largest worker peak MB",
        "largest worker",
        title=f"curation of {corpus}, {workers} workers, {block_mb} MB blocks",
    )
    for row in results:
        table.add_row(
            str(row["copies"]),
            f"{row['documents']:,}",
            f"{row['megabytes']:.1f}",
            f"{row['seconds']:.1f}",
            f"{row['driver_peak_mb']:,.0f}",
            f"{row['worker_peak_mb']:,.0f}",
            row["largest_worker"].removeprefix("ray::"),
        )
    _emit(as_json, results, table)


@bench_app.command("train")
def bench_train(
    data: Annotated[str, typer.Option(help="A finished shard set.")] = "rayllm-work/data",
    workers: Annotated[int, typer.Option(help="Ranks every layout runs on.")] = 2,
    steps: Annotated[int, typer.Option(help="Timed steps per layout (after one warm-up).")] = 3,
    global_batch: Annotated[int, typer.Option(help="Sequences per step, over all ranks.")] = 8,
    cpus_per_worker: float = 1.0,
    gpu: Annotated[bool, typer.Option(help="One GPU per worker, NCCL.")] = False,
    precision: Annotated[Literal["fp32", "bf16"], typer.Option(help="Compute precision.")] = "fp32",
    strategy: Annotated[
        list[str] | None,
        typer.Option(help="Only the layouts of ddp, zero or fsdp (repeatable); all if not given."),
    ] = None,
    set: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one setting of the model, e.g. dim=1024."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Every training layout on one table (tokens/s, TFLOP/s, MFU against the measured matmul
    peak), and the trainer at one worker against a plain PyTorch loop (the floor)."""
    import ray
    from rich.table import Table

    from rayllm.bench.layouts import bench_model
    from rayllm.cluster import RayConfig, connect
    from rayllm.data.shards import load_manifest
    from rayllm.paths import absolute_url

    model = bench_model(set or [])
    for name in strategy or []:
        if name not in ("ddp", "zero", "fsdp"):
            raise RayllmError(f"--strategy {name} is not a strategy; use ddp, zero or fsdp")
    load_manifest(absolute_url(data))  # a missing shard set is named before Ray starts
    connect(RayConfig())
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpu and gpus < workers:
        raise RayllmError(
            f"--gpu needs {workers} GPUs (one per worker) but the Ray cluster has {gpus:g}; "
            "lower --workers or leave out --gpu"
        )
    from rayllm.bench.train import benchmark  # torch and Ray Train: once the settings hold

    title, rows = benchmark(
        data,
        workers,
        steps,
        global_batch,
        cpus_per_worker,
        use_gpu=gpu,
        precision=precision,
        model=model,
        strategies=strategy,
    )
    columns = ["layout", "workers", "last loss", "tokens/s", "TFLOP/s per worker", "MFU"]
    columns += ["vs floor"]
    columns += ["params + grads + optimizer MB per rank", "ZeRO paper's figure"]
    columns += ["peak GPU MB per rank"] if gpu else []
    table = Table(*columns, title=title)
    for row in rows:
        theory = row.get("theory_mb_per_rank")
        cells = [
            row["layout"],
            str(row["workers"]),
            f"{row['loss']:.4f}" if "loss" in row else "-",
            f"{row['tokens_per_s']:,.0f}",
            f"{row['tflops_per_worker']:.3f}",
            f"{row['mfu']:.1%}",
            f"{row['vs_floor']:.2f}x",
            f"{row['held_mb_per_rank']:,.1f}" if "held_mb_per_rank" in row else "-",
            f"{theory:,.1f}" if theory else "-",
        ]
        cells += [f"{row['peak_mb_per_rank']:,.0f}" if "peak_mb_per_rank" in row else "-"] * gpu
        table.add_row(*cells)
    _emit(as_json, rows, table)


@bench_app.command("compress")
def bench_compress(
    source: Annotated[str, typer.Option(help="Registry reference compressed.")] = "smollm2",
    registry: Annotated[str | None, typer.Option(help="Registry root of --source.")] = None,
    data: Annotated[
        str, typer.Option(help="Shard set: calibration and held-out text.")
    ] = "rayllm-work/data-bible",
    method: Annotated[
        list[str] | None,
        typer.Option(
            help="Compress settings of one result, e.g. method=prune,prune.sparsity=0.25 "
            "(repeatable; default: GPTQ and RTN int4, w8a8, channel and layer pruning)."
        ),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option(help="quantize.group_size of every method that sets none.")
    ] = 64,
    system: Annotated[
        str,
        typer.Option(
            help="What serves each version: rayllm, vllm (its own server), or 'hf generate' "
            "(transformers, one request at a time)."
        ),
    ] = "rayllm",
    calibration_rows: Annotated[int, typer.Option(help="Training rows calibrating.")] = 64,
    eval_rows: Annotated[int, typer.Option(help="Validation rows measured.")] = 48,
    requests: Annotated[int, typer.Option(help="Requests per served version.")] = 16,
    output_tokens: Annotated[int, typer.Option(help="Tokens every request generates.")] = 32,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 4,
    as_json: JsonOption = False,
) -> None:
    """Each compression method on the same source and held-out text: weights on disk,
    held-out perplexity, time to compress, and decode tokens/s served by rayllm's app."""
    from rich.table import Table

    from rayllm.bench.compress import METHODS, benchmark
    from rayllm.bench.load import Load
    from rayllm.data.shards import load_manifest
    from rayllm.paths import absolute_url

    load_manifest(absolute_url(data))  # a missing shard set is named before any work
    if system not in ("rayllm", "vllm", "hf generate"):
        raise RayllmError(f"--system {system!r}: choose rayllm, vllm or 'hf generate'")
    result = benchmark(
        source,
        registry,
        absolute_url(data),
        method or list(METHODS),
        group_size,
        {"calibration_rows": calibration_rows, "eval_rows": eval_rows},
        Load(requests, output_tokens, concurrency=concurrency),
        system,
        {"max_num_seqs": max(4, concurrency), "kv_cache_gib": 1.0},
        48,
    )
    columns = ["method", "version", "weights MB", "vs source", "perplexity", "vs source"]
    columns += ["compress s", "output tok/s", "vs source"]
    title = f"{result['source']}, held-out text of {result['data']}, {result['load']}"
    table = Table(*columns, title=title)
    for row in result["rows"]:
        table.add_row(
            row["method"],
            row["version"],
            f"{row['bytes'] / 1e6:,.1f}",
            f"{row['size_vs_source']:.2f}x",
            f"{row['perplexity']:.2f}",
            f"{row['perplexity_vs_source']:.3f}x",
            f"{row['compress_seconds']:.0f}" if "compress_seconds" in row else "-",
            f"{row['output_tokens_per_s']:,.1f}",
            f"{row['speed_vs_source']:.2f}x",
        )
    _emit(as_json, result, table)


@bench_app.command("serve")
def bench_serve(
    model: Annotated[
        str | None, typer.Option(help="Registry reference; default: a 28 M random decoder.")
    ] = None,
    registry: Annotated[str | None, typer.Option(help="Registry root of --model.")] = None,
    system: Annotated[
        list[str] | None,
        typer.Option(
            help="rayllm, 'rayllm direct', 'ray.serve.llm defaults', vllm, 'hf generate' (repeatable)."
        ),
    ] = None,
    concurrency: Annotated[
        list[int] | None, typer.Option(help="Closed-loop concurrency (repeatable).")
    ] = None,
    rate: Annotated[
        list[float] | None, typer.Option(help="Open-loop Poisson arrivals per second.")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests per load.")] = 48,
    output_tokens: Annotated[int, typer.Option(help="Tokens every request generates.")] = 64,
    prompt_words: Annotated[int, typer.Option(help="Words per prompt.")] = 48,
    shared_prefix_words: Annotated[
        int, typer.Option(help="Words every prompt starts with (prefix caching's case).")
    ] = 0,
    max_num_seqs: int = 16,
    kv_cache_gib: float = 1.0,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="Engine settings to run each system with, e.g. kv_cache_gib=0.05,"
            "prefix_caching=false, or replica settings (Ray Serve systems), e.g. "
            "stream_batching_ms=10 (repeatable; default: the settings above)."
        ),
    ] = None,
    hf_requests: Annotated[int, typer.Option(help="Requests hf generate runs.")] = 8,
    gpu: Annotated[
        bool,
        typer.Option(help="Every system on this machine's GPUs, one per tensor-parallel rank."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """rayllm's app against vLLM's own OpenAI server and Hugging Face generate: output
    tokens/s, TTFT, TPOT, inter-token and end-to-end latency, on the same model and prompts,
    under each variant of the engine's or the replicas' settings."""
    from rich.table import Table

    from rayllm.bench.load import Load
    from rayllm.bench.serve import SYSTEMS, benchmark, parse_variant

    loads = [Load(requests, output_tokens, concurrency=c) for c in (concurrency or [])]
    loads += [Load(requests, output_tokens, rate=r) for r in (rate or [])]
    if not loads:
        loads = [Load(requests, output_tokens, concurrency=c) for c in (1, 8)]
    if min(concurrency or [1]) < 1 or min(rate or [1]) <= 0:
        raise RayllmError("--concurrency must be at least 1 and --rate above 0")
    result = benchmark(
        registry,
        model,
        loads,
        system or list(SYSTEMS),
        prompt_words,
        {"max_num_seqs": max_num_seqs, "kv_cache_gib": kv_cache_gib},
        hf_requests,
        [parse_variant(text) for text in variant or []],
        shared_prefix_words,
        use_gpu=gpu,
    )
    columns = [
        "system",
        "variant",
        "load",
        "output tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "TPOT p50 ms",
    ]
    columns += ["ITL p50 ms", "E2E p50 ms", "vs vLLM tok/s", "vs vLLM TTFT", "vs hf generate"]
    columns += ["failed"]
    table = Table(*columns, title=f"{result['model']}, {output_tokens} output tokens per request")

    def cell(row: dict, key: str, form: str = "{:,.0f}") -> str:
        return form.format(row[key]) if key in row else "-"

    for row in result["rows"]:
        table.add_row(
            row["system"],
            row.get("variant") or "-",
            row["load"],
            cell(row, "output_tokens_per_s", "{:,.1f}"),
            cell(row, "ttft_p50_ms"),
            cell(row, "ttft_p99_ms"),
            cell(row, "tpot_p50_ms", "{:.1f}"),
            cell(row, "itl_p50_ms", "{:.1f}"),
            cell(row, "e2e_p50_ms"),
            cell(row, "vs_vllm_tokens_per_s", "{:.2f}x"),
            cell(row, "vs_vllm_ttft_p50", "{:.2f}x"),
            cell(row, "vs_hf_generate", "{:.2f}x"),
            str(row["failed"]),
        )
    _emit(as_json, result, table)


def main() -> None:
    # With --json, stdout holds the JSON alone: progress, and what Ray's workers print (Ray
    # forwards it to the driver's sys.stdout), go to stderr.
    output = (
        contextlib.redirect_stdout(sys.stderr) if "--json" in sys.argv else contextlib.nullcontext()
    )
    try:
        with output:
            app()  # bad flags and arguments: typer prints the usage and exits 2
    except RayllmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
