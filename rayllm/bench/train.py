"""Every training strategy on the same model, data and global batch, in one worker group.

:func:`compare_strategies` launches one Ray Train worker group and, inside it, builds each
strategy's engine in turn on the same ranks, trains it for a few steps on the same global
batches, and records per step the loss, the time, and per rank the live tensor memory (model,
gradients and optimizer state as the strategy holds them). The tests use it to check that
every strategy computes the same numbers as DDP; ``rayllm bench train`` uses it for speed and
memory. One launch for the whole matrix keeps both fast.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer

from rayllm.data.shards import load_manifest
from rayllm.errors import RayllmError
from rayllm.train.batches import TokenBatches
from rayllm.train.checkpoint import write_progress
from rayllm.train.config import ParallelConfig, TrainConfig
from rayllm.train.engine import build_engine
from rayllm.train.mesh import mesh_shape
from rayllm.train.metrics import measure_peak_tflops
from rayllm.train.trainer import resolve_model_shape

RESULTS = "results.json"
LAYOUTS: list[dict[str, Any]] = [
    {"strategy": "ddp"},
    {"strategy": "zero", "zero_stage": 1},
    {"strategy": "zero", "zero_stage": 2},
    {"strategy": "zero", "zero_stage": 3},
    {"strategy": "fsdp"},
    {"strategy": "fsdp", "dp_replicate": 2},
    {"strategy": "fsdp", "tp": 2},
    {"strategy": "ddp", "pp": 2, "pp_schedule": "gpipe"},
    {"strategy": "fsdp", "pp": 2, "pp_schedule": "1f1b"},
    {"strategy": "fsdp", "pp": 2, "tp": 2},
]
"""The layouts compared by default: each ZeRO stage and each torch strategy, alone and on
2-D and 3-D meshes (the data-parallel size is what the workers leave)."""


def layout_name(parallel: dict[str, Any], workers: int) -> str:
    """``fsdp x tp2 (dp 2)``: the strategy and the data-parallel size it gets."""
    config = ParallelConfig.model_validate(parallel)
    return f"{config.describe()} (dp {workers // (config.tp * config.pp)})"


def compare_strategies(
    data: str,
    layouts: list[dict[str, Any]],
    *,
    workers: int,
    global_batch: int,
    steps: int,
    model: dict[str, Any],
    cpus_per_worker: float = 1.0,
    settings: dict[str, Any] | None = None,
    checkpoints: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run each layout for ``steps`` steps on ``workers`` ranks; results by :func:`layout_name`.

    ``checkpoints``: a local folder every rank can write; each layout saves its final state
    there (``<checkpoints>/<index>``, in the order given) for
    :func:`rayllm.train.checkpoint.consolidate`.
    """
    manifest = load_manifest(data)
    configs = {}
    for parallel in layouts:
        name = layout_name(parallel, workers)
        config = TrainConfig.model_validate(
            {
                "data": data,
                "num_workers": workers,
                "cpus_per_worker": cpus_per_worker,
                "steps": steps,
                "warmup_steps": 0,
                "model": model,
                "parallel": parallel,
                **(settings or {}),
            }
        )
        config = resolve_model_shape(config, manifest)
        shape = mesh_shape(config)
        if global_batch % shape.dp:
            raise RayllmError(
                f"{name}: global batch {global_batch} does not split over dp {shape.dp}"
            )
        micro = global_batch // shape.dp
        configs[name] = config.model_copy(update={"micro_batch_size": micro})
        mesh_shape(configs[name])  # the micro-batch must split into pipeline micro-batches
    with tempfile.TemporaryDirectory(prefix="rayllm-compare-") as storage:
        trainer = TorchTrainer(
            _compare_loop,
            train_loop_config={
                "configs": {name: c.model_dump(mode="json") for name, c in configs.items()},
                "manifest": manifest,
                "checkpoints": checkpoints,
            },
            torch_config=TorchConfig(backend="gloo", timeout_s=600),
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name="rayllm-compare-strategies",
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=0),
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / RESULTS).read_text())


def _compare_loop(settings: dict[str, Any]) -> None:
    from rayllm.train.loop import quiet_worker_logs

    quiet_worker_logs()
    rank = ray.train.get_context().get_world_rank()
    device = torch.device("cpu")
    results = {}
    peak = None
    for index, (name, raw) in enumerate(settings["configs"].items()):
        config = TrainConfig.model_validate(raw)
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
        peak = peak or measure_peak_tflops(device, torch.float32)
        torch.manual_seed(config.seed)
        shape = mesh_shape(config)
        engine = build_engine(config, shape, device)
        batches = TokenBatches(
            config.data,
            settings["manifest"]["shards"]["train"],
            dp_rank=(rank // shape.tp) % shape.dp,
            dp_size=shape.dp,
            batch=config.micro_batch_size,
            seed=config.seed,
        )
        losses, seconds = [], []
        for step in range(config.steps):
            window = [
                batches.get(step * config.grad_accum_steps + m)
                for m in range(config.grad_accum_steps)
            ]
            dist.barrier()
            started = time.perf_counter()
            loss, _ = engine.train_step(window)
            dist.barrier()
            seconds.append(time.perf_counter() - started)
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / dist.get_world_size())
        if settings["checkpoints"]:
            folder = Path(settings["checkpoints"]) / str(index)
            engine.save(folder)
            if rank == 0:
                write_progress(
                    folder, config.steps, {"model": raw["model"], "parallel": raw["parallel"]}
                )
        results[name] = {
            "losses": losses,
            "step_seconds": seconds,
            "peak_tflops": peak,
        }
        del engine
        gc.collect()
        dist.barrier()
    # Ray Train hands the driver what a checkpoint carries: the results travel in one.
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            (Path(folder) / RESULTS).write_text(json.dumps(results))
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report({}, checkpoint=checkpoint)
