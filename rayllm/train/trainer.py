"""The training stage on Ray Train: a TorchTrainer running :mod:`rayllm.train.loop` on its workers."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from rayllm.data.shards import manifest_sha256, shard_dataset
from rayllm.data.tokenizer import load_tokenizer, with_chat_template
from rayllm.errors import RayllmError
from rayllm.model.hf import save_hf_model
from rayllm.paths import (
    MARKER,
    cache_dir,
    filesystem,
    staged_folder,
)
from rayllm.progress import Stage, console
from rayllm.train.checkpoint import STOPPED, check_resumable, consolidate, run_layout
from rayllm.train.config import TrainConfig
from rayllm.train.preflight import Checked, preflight
from rayllm.version import code_version

RAY_TRAIN_MARKER = ".validate_storage_marker"
"""A file Ray Train writes into every run folder it creates."""


@dataclass(frozen=True)
class TrainResult:
    model: str
    """The trained model: a complete Hugging Face folder (weights, config, tokenizer with its
    chat template, ``manifest.json``), ready for ``rayllm registry publish``."""
    data: str
    """The shard set it was trained on."""
    metrics: dict[str, Any]
    checkpoint: str
    seconds: float


def run(config: TrainConfig, checked: Checked | None = None) -> TrainResult:
    """Train on ``config.data``; publish the Hugging Face-format model to ``config.output``.
    ``checked``: what :func:`preflight` returned for ``config``, where the caller ran it
    already (the CLI, before it connects to Ray); otherwise it runs here."""
    config, manifest, shape = checked or preflight(config)
    layout = run_layout(config, manifest_sha256(config.data), manifest)
    run_folder = f"{config.storage.rstrip('/')}/{config.run_name}"
    started = time.time()
    with Stage(f"train: {config.parallel.describe()} on {config.num_workers} workers") as stage:
        prepare_run_folder(run_folder, config, layout)
        console.print(
            f"  model {config.model.num_params() / 1e6:.2f} M parameters, mesh {shape}, "
            f"{config.steps} steps of {shape.dp * config.micro_batch_size * config.grad_accum_steps}"
            f" x {manifest['seq_len']} tokens"
        )
        result = fit(config, manifest, layout, run_folder)
        metrics = dict(result.metrics or {})
        with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as hf:
            model_config, state, _ = consolidate(Path(folder))
            save_hf_model(
                hf,
                model_config,
                state,
                bos_token_id=manifest["eos_token_id"],
                eos_token_id=manifest["eos_token_id"],
            )
            write_model(Path(hf), config, metrics=metrics, checkpoint=result.checkpoint.path)
        stage.note(
            f"loss {metrics.get('loss', float('nan')):.3f}, {metrics.get('tokens_per_s', 0):,.0f} tok/s"
            f" -> {config.output}"
        )
    return TrainResult(
        model=config.output,
        data=config.data,
        metrics=metrics,
        checkpoint=result.checkpoint.path,
        seconds=time.time() - started,
    )


def fit(
    config: TrainConfig,
    manifest: dict[str, Any],
    layout: dict[str, Any],
    run_folder: str,
    examples: dict[str, ray.ObjectRef] | None = None,
) -> ray.train.Result:
    """Run the worker group to the end (restarting it after failures, as configured); a user
    error inside a worker or a loss that became NaN is raised as the user error it is.
    ``examples``: packed fine-tuning examples per split, read instead of the shard set."""
    extra = {"examples": examples} if examples else {}
    try:
        result = _trainer(config, manifest, layout, run_folder, extra).fit()
    except ray.train.TrainingFailedError as error:
        user_error = _user_error_in(error)
        if user_error is None:
            raise
        raise user_error from error
    check_finite(run_folder, result)
    return result


def _trainer(
    config: TrainConfig,
    manifest: dict[str, Any],
    layout: dict[str, Any],
    run_folder: str,
    extra: dict[str, Any],
) -> TorchTrainer:
    return TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "manifest": manifest,
            "layout": layout,
            "run_folder": run_folder,
        }
        | extra,
        torch_config=TorchConfig(
            backend="nccl" if config.use_gpu else "gloo", timeout_s=config.timeout_s
        ),
        datasets=_datasets(config),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
            placement_strategy=config.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=config.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )


def _worker_loop(settings: dict[str, Any]) -> None:
    """A worker's entry point. The loop's engines import PyTorch's parallel packages (~2 s):
    the workers need them, the driver, which only launches and publishes, does not."""
    from rayllm.train.loop import train_loop_per_worker

    train_loop_per_worker(settings)


def prepare_run_folder(run_folder: str, config: TrainConfig, layout: dict[str, Any]) -> None:
    """Resume (checked against the checkpoint's layout) or start over, as the user said."""
    if not config.resume:
        start_over(run_folder, config.overwrite)
        return
    step = check_resumable(run_folder, layout)
    console.print(f"  resuming {run_folder} from step {step}")
    fs, stopped = filesystem(f"{run_folder}/{STOPPED}")
    if fs.exists(stopped):  # a run stopped by a NaN loss, resumed with new settings
        fs.rm(stopped)


def check_finite(run_folder: str, result: ray.train.Result) -> None:
    """Raise the user error a run that stopped on a NaN or infinite loss left a marker for."""
    fs, stopped = filesystem(f"{run_folder}/{STOPPED}")
    if not fs.exists(stopped):
        return
    step = json.loads(fs.cat_file(stopped))["step"]
    kept = result.checkpoint.path if result.checkpoint else "none was written"
    raise RayllmError(
        f"the loss became NaN or infinite at step {step}; training stopped there. The last "
        f"good checkpoint: {kept}. Lower learning_rate or grad_clip, or check the data; "
        "train.resume=true continues from that checkpoint"
    )


def _datasets(config: TrainConfig) -> dict[str, ray.data.Dataset]:
    """With ``data_loader: ray_data``, the train split as a Ray Data dataset that Ray Train
    splits over the ranks. Ray Data needs CPUs of its own beside the workers' (without them
    the run stalls silently), so the workers may not take all of the cluster's."""
    if config.data_loader != "ray_data":
        return {}
    spare = ray.cluster_resources().get("CPU", 0) - config.num_workers * config.cpus_per_worker
    if spare < 1:
        raise RayllmError(
            f"data_loader ray_data needs at least 1 CPU beside the workers' "
            f"{config.num_workers} x {config.cpus_per_worker:g}, and the cluster has "
            f"{spare + config.num_workers * config.cpus_per_worker:g}; lower cpus_per_worker "
            "or num_workers, or use data_loader mmap"
        )
    return {"train": shard_dataset(config.data, "train")}


def start_over(run_folder: str, overwrite: bool) -> None:
    """Remove an earlier Ray Train run of the same name, so that Ray Train does not resume it."""
    fs, path = filesystem(run_folder)
    if not fs.exists(path):
        return
    if not fs.exists(f"{path}/{RAY_TRAIN_MARKER}") and not overwrite:
        raise RayllmError(
            f"{run_folder} exists and is not a Ray Train run; pick another train.run_name or "
            "train.storage, or set train.overwrite=true to replace it"
        )
    console.print(
        f"  starting over: replacing the earlier run in {run_folder} "
        "(set train.resume=true to continue it instead)"
    )
    fs.rm(path, recursive=True)
    fs.invalidate_cache()


def _user_error_in(error: BaseException) -> RayllmError | None:
    """A :class:`RayllmError` raised inside a worker (a damaged shard, say), if that is what
    failed the run: it is reported as the user error it is, not as a worker traceback."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, RayllmError):
            return RayllmError(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    marker = "rayllm.errors.RayllmError: "
    if marker in text:
        return RayllmError(text.split(marker, 1)[1].strip().splitlines()[0])
    return None


def write_model(weights: Path, config: TrainConfig, metrics: dict, checkpoint: str) -> None:
    """Publish weights + tokenizer (with a chat template) + manifest to ``config.output``.

    The manifest records where the model came from; ``rayllm registry publish`` reads it as
    the version's lineage.
    """
    tokenizer = with_chat_template(load_tokenizer(f"{config.data}/tokenizer"))
    with staged_folder(config.output) as (fs, staging):
        fs.put(f"{weights}/", staging, recursive=True)
        with tempfile.TemporaryDirectory(prefix="rayllm-tokenizer-") as local:
            tokenizer.save_pretrained(local)
            fs.put(f"{local}/", staging, recursive=True)
        manifest = {
            "format": "rayllm.model/1",
            "data": {"url": config.data, "manifest_sha256": manifest_sha256(config.data)},
            "training": config.model_dump(mode="json"),
            "checkpoint": checkpoint,
            "metrics": metrics,
            "code": code_version(),
        }
        fs.pipe_file(f"{staging}/{MARKER}", json.dumps(manifest, indent=2).encode())


def worker_env() -> dict[str, str]:
    """Quiet, deterministic workers; DeepSpeed's C++ ops from the cache the install built
    (elsewhere DeepSpeed compiles them again, minutes on a small machine)."""

    return {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")
        ),
        "TOKENIZERS_PARALLELISM": "false",
    }
