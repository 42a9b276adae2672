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

from rayllm.bench.layouts import (
    BENCH_MODEL,
    LAYOUTS,
    fits,
    layout_name,
    parallel_settings,
    theory_mb,
)
from rayllm.data.shards import load_manifest
from rayllm.errors import RayllmError
from rayllm.model.model import Transformer, next_token_loss
from rayllm.paths import absolute_url
from rayllm.train.batches import TokenBatches, step_window, to_device
from rayllm.train.checkpoint import write_progress
from rayllm.train.config import TrainConfig
from rayllm.train.engine import build_engine, compute_dtype
from rayllm.train.mesh import mesh_shape
from rayllm.train.metrics import measure_peak_tflops, peak_memory_mb, synchronize
from rayllm.train.preflight import resolve_model_shape
from rayllm.train.trainer import worker_env

RESULTS = "results.json"


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
    """Run each layout (``parallel`` settings, and ``lora`` ones where it trains adapters)
    for ``steps`` steps on ``workers`` ranks; results by :func:`layout_name`.

    ``checkpoints``: a local folder every rank can write; each layout saves its final state
    there (``<checkpoints>/<index>``, in the order given) for
    :func:`rayllm.train.checkpoint.consolidate`.
    """
    manifest = load_manifest(data)
    use_gpu = bool((settings or {}).get("use_gpu"))
    configs = {}
    for layout in layouts:
        name = layout_name(layout, workers)
        config = TrainConfig.model_validate(
            {
                "data": data,
                "num_workers": workers,
                "cpus_per_worker": cpus_per_worker,
                "steps": steps,
                "warmup_steps": 0,
                "model": model,
                "parallel": parallel_settings(layout),
                "lora": layout.get("lora"),
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
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=600),
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {}),
            ),
            run_config=ray.train.RunConfig(
                name="rayllm-compare-strategies",
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=0),
                worker_runtime_env={"env_vars": worker_env()},
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / RESULTS).read_text())


def _compare_loop(settings: dict[str, Any]) -> None:
    from rayllm.train.loop import quiet_worker_logs, worker_device

    quiet_worker_logs()
    rank = ray.train.get_context().get_world_rank()
    results = {}
    peak = None
    for index, (name, raw) in enumerate(settings["configs"].items()):
        config = TrainConfig.model_validate(raw)
        device = worker_device(config)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
        peak = peak or measure_peak_tflops(device, compute_dtype(config.precision))
        torch.manual_seed(config.seed)
        shape = mesh_shape(config)
        engine = build_engine(config, shape, device)
        batches = TokenBatches.for_rank(
            config, settings["manifest"]["shards"]["train"], shape, rank
        )
        losses, seconds = [], []
        for step in range(config.steps):
            window = [
                to_device(batch, device)
                for batch in step_window(batches, step, config.grad_accum_steps)
            ]
            synchronize(device)
            dist.barrier()
            started = time.perf_counter()
            loss, _ = engine.train_step(window)
            synchronize(device)
            dist.barrier()
            seconds.append(time.perf_counter() - started)
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / dist.get_world_size())
        if settings["checkpoints"]:
            folder = Path(settings["checkpoints"]) / str(index)
            engine.save(folder)
            if rank == 0:
                kept = {key: raw[key] for key in ("model", "parallel", "lora")}
                write_progress(folder, config.steps, kept)
        held: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(held, engine.held_memory())
        results[name] = {
            "losses": losses,
            "step_seconds": seconds,
            "peak_tflops": peak,
            "held_mb": [sum(rank.values()) / 2**20 for rank in held],
        }
        if device.type == "cuda":  # on CPU the process's peak spans every layout run before
            peaks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(peaks, peak_memory_mb(device))
            results[name]["peak_mb"] = peaks
        if rank == 0:
            print(
                f"[compare] {name}: loss {losses[-1]:.4f}, {sum(seconds) / len(seconds):.3f} s/step",
                flush=True,
            )
        del engine
        gc.collect()
        dist.barrier()
    # Ray Train hands the driver what a checkpoint carries: the results travel in one.
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            (Path(folder) / RESULTS).write_text(json.dumps(results))
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report({}, checkpoint=checkpoint)


def plain_loop(
    data: str,
    model: dict[str, Any],
    micro_batch: int,
    steps: int,
    threads: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> list[float]:
    """The floor: step times of a plain single-process PyTorch loop (AdamW, no Ray, no
    process group) on the same model, batches, threads and device as the rayllm trainer's; at
    bf16, autocast over fp32 weights."""
    manifest = load_manifest(data)
    config = resolve_model_shape(
        TrainConfig.model_validate({"data": data, "model": model}), manifest
    )
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    device = torch.device(device)
    network = Transformer(config.model).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate)
    batches = TokenBatches(
        data, manifest["shards"]["train"], dp_rank=0, dp_size=1, batch=micro_batch, seed=0
    )
    seconds = []
    for step in range(steps):
        inputs, targets = to_device(batches.get(step), device)
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            loss = next_token_loss(network(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def benchmark(
    data: str,
    workers: int,
    steps: int,
    global_batch: int,
    cpus_per_worker: float,
    *,
    use_gpu: bool = False,
    precision: str = "fp32",
    model: dict[str, Any] = BENCH_MODEL,
    strategies: list[str] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """``rayllm bench train``: every layout that fits ``workers`` on ``model`` (those of
    ``strategies`` only, if given), the trainer on one worker, and the plain loop, over the
    same ``steps`` timed steps (after one warm-up step each); a title and one row per system.
    ``use_gpu``: one GPU per worker and NCCL, and the plain loop on this process's GPU."""
    data = absolute_url(data)
    manifest = load_manifest(data)
    fitting = [
        layout
        for layout in LAYOUTS
        if fits(layout, workers, global_batch, model)
        and (not strategies or layout["strategy"] in strategies)
    ]
    common = {
        "global_batch": global_batch,
        "steps": steps + 1,
        "model": model,
        "cpus_per_worker": cpus_per_worker,
        "settings": {"use_gpu": use_gpu, "precision": precision},
    }
    results = compare_strategies(data, fitting, workers=workers, **common)
    (single,) = compare_strategies(data, [{"strategy": "ddp"}], workers=1, **common).values()
    device = "cuda" if use_gpu else "cpu"
    threads = max(1, int(cpus_per_worker))
    floor = plain_loop(data, model, global_batch, steps + 1, threads, device, precision)
    config = resolve_model_shape(TrainConfig.model_validate({"model": model}), manifest)
    tokens = global_batch * manifest["seq_len"]
    flops = config.model.flops_per_token(manifest["seq_len"])

    def row(name: str, ranks: int, seconds: list[float], result: dict) -> dict[str, Any]:
        tokens_per_s = tokens / (sum(seconds[1:]) / steps)
        tflops = tokens_per_s * flops / ranks / 1e12
        measured = {"layout": name, "workers": ranks, "tokens_per_s": tokens_per_s}
        measured["tflops_per_worker"] = tflops
        measured["mfu"] = tflops / result["peak_tflops"]
        if "losses" in result:
            measured["losses"] = result["losses"]
            measured["loss"] = result["losses"][-1]
        if "held_mb" in result:
            measured["held_mb_per_rank"] = max(result["held_mb"])
            if "peak_mb" in result:
                measured["peak_mb_per_rank"] = max(result["peak_mb"])
        return measured

    rows = []
    params = config.model.num_params()
    for layout, (name, result) in zip(fitting, results.items(), strict=True):
        rows.append(row(name, workers, result["step_seconds"], result))
        rows[-1]["theory_mb_per_rank"] = theory_mb(layout, params, workers)
    rows.append(row("rayllm, 1 worker", 1, single["step_seconds"], single))
    peak = measure_peak_tflops(torch.device(device), compute_dtype(precision))  # loop's threads
    rows.append(row("plain PyTorch loop (floor)", 1, floor, {"peak_tflops": peak}))
    for measured in rows:
        measured["vs_floor"] = measured["tokens_per_s"] / rows[-1]["tokens_per_s"]
    where = "1 GPU" if use_gpu else f"{cpus_per_worker:g} CPU"
    title = (
        f"{params / 1e6:.0f} M parameters, {global_batch} x {manifest['seq_len']} tokens per "
        f"step, {precision}, {where} per worker"
    )
    return title, rows
