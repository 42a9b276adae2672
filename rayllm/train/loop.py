"""The training loop each Ray Train worker runs: batch, step, log, evaluate, checkpoint."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from rayllm.paths import filesystem
from rayllm.train.batches import (
    Batches,
    ExampleBatches,
    StreamedBatches,
    TokenBatches,
    step_window,
    to_device,
)
from rayllm.train.checkpoint import STOPPED, read_progress, write_progress
from rayllm.train.config import TrainConfig
from rayllm.train.engine import Engine, build_engine, compute_dtype
from rayllm.train.mesh import MeshShape, mesh_shape
from rayllm.train.metrics import (
    METRICS_LOG,
    MetricsLog,
    measure_peak_tflops,
    peak_memory_mb,
    step_metrics,
)
from rayllm.train.objectives import preference_margins, segment_logprobs


def train_loop_per_worker(settings: dict[str, Any]) -> None:
    quiet_worker_logs()
    config = TrainConfig.model_validate(settings["config"])
    manifest, layout = settings["manifest"], settings["layout"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    torch.manual_seed(config.seed)
    device = worker_device(config)
    shape = mesh_shape(config)
    engine = build_engine(config, shape, device)
    data = _readers(config, settings, shape, rank)
    if config.objective == "dpo":  # with the starting weights, before a checkpoint loads
        for reader in data.values():
            add_reference(engine, reader, device)
        _log(rank, "reference log-probabilities of every pair computed")
    start_step = _resume(engine, rank)
    peak = config.peak_tflops_per_worker or measure_peak_tflops(
        device, compute_dtype(config.precision)
    )
    run_folder = settings["run_folder"]
    log = MetricsLog(f"{run_folder}/{METRICS_LOG}", start_step) if rank == 0 else None
    tokens_per_step = (
        shape.dp * config.micro_batch_size * config.grad_accum_steps * manifest["seq_len"]
    )
    flops_per_token = config.model.flops_per_token(
        manifest["seq_len"], frozen=bool(config.lora or config.prompt)
    )
    _log(rank, f"{config.parallel.describe()} on mesh {shape}, peak {peak:.3f} TFLOP/s per worker")
    if config.init_from and start_step == 0:  # where the starting weights stand
        before = {"step": 0} | _evaluation(config, engine, data["val"], device)
        _log(rank, f"step {0:>5}/{config.steps}  {_format_eval(before)} (starting weights)")
        if log:
            log.write(before)
    # Throughput and MFU over the steps since the last logged one (one step's time is noise),
    # timing only the steps: evaluations and checkpoints in between are not counted.
    window_tokens, window_seconds = 0, 0.0
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        window = [
            to_device(batch, device)
            for batch in step_window(data["train"], step, config.grad_accum_steps)
        ]
        loss, grad_norm = engine.train_step(window)
        loss_value = _mean_over_ranks(loss)
        if not math.isfinite(loss_value):
            _log(rank, f"loss is {loss_value} at step {step + 1}: stopping")
            if rank == 0:
                fs, path = filesystem(f"{run_folder}/{STOPPED}")
                fs.pipe_file(path, json.dumps({"step": step + 1, "loss": loss_value}).encode())
            return
        window_tokens += tokens_per_step
        window_seconds += time.perf_counter() - started
        metrics = {
            "step": step + 1,
            "loss": loss_value,
            "lr": engine.learning_rate(),
            "grad_norm": grad_norm,
        } | step_metrics(
            tokens=window_tokens,
            seconds=window_seconds,
            flops_per_token=flops_per_token,
            workers=world,
            peak=peak,
        )
        last = step + 1 == config.steps
        if (step + 1) % config.eval_every == 0 or last:
            metrics |= _evaluation(config, engine, data["val"], device)
        logged = (step + 1) % config.log_every == 0 or last
        if logged:
            metrics["peak_memory_mb"] = _gather(peak_memory_mb(device))
            _log(rank, _format(metrics, config.steps))
            if log:
                log.write(metrics)
            window_tokens, window_seconds = 0, 0.0
        if (step + 1) % config.checkpoint_every == 0 or last:
            _report_checkpoint(engine, metrics, rank, layout)
        elif logged:
            ray.train.report(metrics)


def _readers(
    config: TrainConfig, settings: dict[str, Any], shape: MeshShape, rank: int
) -> dict[str, Batches]:
    """This rank's reader of each split: packed fine-tuning examples (handed over through the
    object store), or the shard set's memory-mapped shards, the train split perhaps streamed
    by Ray Data instead."""
    if "examples" in settings:
        return {
            split: ExampleBatches.for_rank(config, ray.get(packed), shape, rank)
            for split, packed in settings["examples"].items()
        }
    shards = settings["manifest"]["shards"]
    streamed = config.data_loader == "ray_data"
    train = StreamedBatches(config.micro_batch_size, config.seed) if streamed else None
    return {
        "train": train or TokenBatches.for_rank(config, shards["train"], shape, rank),
        "val": TokenBatches.for_rank(config, shards["val"], shape, rank),
    }


def _resume(engine: Engine, rank: int) -> int:
    """The step to start from: 0, or the step of the checkpoint Ray Train hands back after a
    restart or to a resumed run."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as folder:
        engine.load(Path(folder))
        step = read_progress(Path(folder))["step"]
    _log(rank, f"resumed from the checkpoint at step {step}")
    return step


def _evaluation(
    config: TrainConfig, engine: Engine, val: Batches, device: torch.device
) -> dict[str, float]:
    """Held-out loss and perplexity; for DPO, the held-out DPO loss and the share of pairs
    whose chosen answer the model prefers: by its own log-probabilities (``preference_accuracy``)
    and by DPO's implicit reward (``reward_accuracy``)."""
    if config.objective != "dpo":
        batches = range(config.eval_batches)
        loss = _mean_over_ranks(
            sum(engine.evaluate(to_device(val.get(index), device)) for index in batches)
            / config.eval_batches
        )
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    totals = torch.zeros(4, device=device)  # summed over every rank: ratios are what count
    for index in range(config.eval_batches):
        batch = to_device(val.get(index), device)
        logits = engine.forward(batch)
        if logits is None:  # a pipeline stage before the last
            continue
        rewards, policy = preference_margins(logits, batch, config.dpo_beta)
        totals += torch.stack(
            [
                -torch.nn.functional.logsigmoid(rewards).sum(),
                torch.tensor(float(len(rewards)), device=device),
                (policy > 0).sum().float(),
                (rewards > 0).sum().float(),
            ]
        )
    dist.all_reduce(totals)
    loss, pairs, preferred, rewarded = totals.tolist()
    return {
        "val_loss": loss / pairs,
        "preference_accuracy": preferred / pairs,
        "reward_accuracy": rewarded / pairs,
    }


def add_reference(engine: Engine, reader: ExampleBatches, device: torch.device) -> None:
    """DPO: every row's reference log-probability per segment, computed once from the engine's
    current (starting) weights. The data-parallel ranks split the rows, every rank running the
    same number of forward passes (sharded layouts need all of them), and share the results
    (under pipeline parallelism, the last stage's)."""
    packed = reader.packed
    rows, count = len(packed["inputs"]), int(packed["segments"].max())
    values = np.full((rows, count), np.nan, dtype=np.float32)
    for start in range(0, rows, reader.global_batch):
        first = start + reader.dp_rank * reader.batch
        mine = np.arange(first, min(first + reader.batch, rows))
        batch = to_device(reader.pick(mine if len(mine) else np.array([0])), device)
        logits = engine.forward(batch)  # None on pipeline stages before the last
        if logits is not None and len(mine):
            values[mine] = segment_logprobs(logits, batch, count).cpu().numpy()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    reference = np.fmax.reduce(gathered)  # NaN only where no rank computed it
    present = packed["segments"][:, :, None] == np.arange(1, count + 1)
    reference[~present.any(axis=1)] = np.nan  # a row with fewer pairs than the most
    reader.packed = packed | {"reference": reference}


def _report_checkpoint(engine: Engine, metrics: dict, rank: int, layout: dict) -> None:
    """Every rank writes its shards; Ray Train gathers them into one checkpoint folder."""
    with tempfile.TemporaryDirectory(prefix="rayllm-ckpt-") as folder:
        engine.save(Path(folder))
        if rank == 0:
            write_progress(Path(folder), metrics["step"], layout)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value.item() / dist.get_world_size()


def _gather(value: float) -> list[float]:
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, round(value, 1))
    return values


def _format_eval(metrics: dict) -> str:
    text = f"val {metrics['val_loss']:.3f}"
    if "preference_accuracy" in metrics:
        text += f" (prefers chosen {metrics['preference_accuracy']:.0%})"
    return text


def _format(metrics: dict, steps: int) -> str:
    text = f"step {metrics['step']:>5}/{steps}  loss {metrics['loss']:.3f}"
    if "val_loss" in metrics:
        text += f"  {_format_eval(metrics)}"
    text += f"  lr {metrics['lr']:.2e}  grad norm {metrics['grad_norm']:.2f}"
    text += f"  {metrics['tokens_per_s']:,.0f} tok/s  MFU {metrics['mfu']:.1%}"
    text += f"  peak {max(metrics['peak_memory_mb']):,.0f} MB/rank"
    return text


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(f"[train] {text}", flush=True)


class _DropTrainReports(logging.Filter):
    """Ray Train logs every ``ray.train.report`` at INFO (under a logger named by its file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Reporting training result")


def worker_device(config: TrainConfig) -> torch.device:
    """This worker's GPU (made the current device) with ``use_gpu``, else the CPU."""
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the device mesh use the current device
    return device


def quiet_worker_logs() -> None:
    """Keep the driver's view to rayllm's own progress lines."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # DTensor advises on reduction layouts at WARNING, once per rank and shape.
    logging.getLogger("torch.distributed.tensor").setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropTrainReports())
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*_register_pre_backward_hook.*")
