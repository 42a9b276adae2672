"""The training stage on Ray Train: a TorchTrainer running ``train_loop_per_worker``."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from rayllm.data.pipeline import load_manifest
from rayllm.errors import RayllmError
from rayllm.paths import absolute_url
from rayllm.progress import Stage, console
from rayllm.train.config import TrainConfig
from rayllm.train.loop import train_loop_per_worker


@dataclass
class TrainResult:
    hf_model: Path
    """The consolidated model in Hugging Face format (a local folder)."""
    metrics: dict[str, Any]
    checkpoint_path: str
    seconds: float


def resolve_model_shape(config: TrainConfig, manifest: dict[str, Any]) -> TrainConfig:
    """Fill the vocabulary and sequence length from the data, and refuse shapes that do not fit."""
    vocab = manifest["vocab_size"]
    model = config.model
    if model.vocab_size == 0:
        model = model.model_copy(update={"vocab_size": -(-vocab // 64) * 64})
    elif model.vocab_size < vocab:
        raise RayllmError(
            f"train.model.vocab_size is {model.vocab_size} but the tokenizer of {config.data} "
            f"has {vocab} tokens; set train.model.vocab_size to at least {vocab} (or 0 for auto)"
        )
    if manifest["seq_len"] > model.max_seq_len:
        raise RayllmError(
            f"the shards hold sequences of {manifest['seq_len']} tokens but "
            f"train.model.max_seq_len is {model.max_seq_len}; raise it or re-run data with a "
            "smaller data.seq_len"
        )
    model = model.model_copy(update={"max_seq_len": manifest["seq_len"]})
    return config.model_copy(
        update={
            "model": model,
            "data": absolute_url(config.data),
            "storage": absolute_url(config.storage),
        }
    )


def run(config: TrainConfig, output: str | Path) -> TrainResult:
    """Train on ``config.data``; copy the final Hugging Face-format model to ``output``."""
    manifest = load_manifest(absolute_url(config.data))
    config = resolve_model_shape(config, manifest)
    started = time.time()
    with Stage(f"train: {config.parallel.strategy} on {config.num_workers} workers") as stage:
        console.print(
            f"  model {config.model.num_params() / 1e6:.2f} M parameters, "
            f"{config.steps} steps of {config.num_workers * config.micro_batch_size * config.grad_accum_steps}"
            f" x {config.model.max_seq_len} tokens"
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": config.model_dump(mode="json"), "manifest": manifest},
            torch_config=TorchConfig(
                backend="nccl" if config.use_gpu else "gloo", timeout_s=config.timeout_s
            ),
            scaling_config=ray.train.ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=config.use_gpu,
                resources_per_worker={"CPU": config.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=config.run_name,
                storage_path=config.storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                worker_runtime_env={"env_vars": _worker_env()},
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        output = Path(output)
        shutil.rmtree(output, ignore_errors=True)
        with result.checkpoint.as_directory() as folder:
            shutil.copytree(Path(folder) / "hf", output)
        metrics = dict(result.metrics or {})
        stage.note(
            f"loss {metrics.get('loss', float('nan')):.3f}, {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        )
    return TrainResult(
        hf_model=output,
        metrics=metrics,
        checkpoint_path=result.checkpoint.path,
        seconds=time.time() - started,
    )


def _worker_env() -> dict[str, str]:
    """Quiet, deterministic workers; DeepSpeed's compiled C++ ops cached across runs."""
    from rayllm.data.corpora import cache_dir

    return {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")
        ),
        "TOKENIZERS_PARALLELISM": "false",
    }
