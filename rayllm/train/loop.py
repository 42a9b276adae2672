"""The training loop each Ray Train worker runs: batch, forward, backward, step, log, checkpoint."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from rayllm.data.shards import read_shard
from rayllm.model.hf import save_hf_model
from rayllm.model.model import Transformer, next_token_loss
from rayllm.train.config import TrainConfig
from rayllm.train.metrics import peak_tflops, step_metrics
from rayllm.train.parallelize import parallelize


class TokenBatches:
    """Micro-batches of packed sequences for one rank: a seeded shuffle per epoch, strided by rank."""

    def __init__(self, data: str, files: list[dict], rank: int, world: int, batch: int, seed: int):
        self.rows = np.concatenate([read_shard(data, f) for f in files])
        self.rank, self.world, self.batch, self.seed = rank, world, batch, seed
        self.per_rank = len(self.rows) // world

    def batches_per_epoch(self) -> int:
        return max(1, self.per_rank // self.batch)

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``index``-th micro-batch of this rank, counted from the start of training."""
        epoch, position = divmod(index, self.batches_per_epoch())
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.rows))
        mine = order[self.rank :: self.world][: self.per_rank]
        picked = mine[(position * self.batch) % len(mine) :][: self.batch]
        rows = torch.from_numpy(self.rows[picked].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def train_loop_per_worker(settings: dict[str, Any]) -> None:
    _quiet_worker_logs()
    config = TrainConfig.model_validate(settings["config"])
    manifest = settings["manifest"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    torch.manual_seed(config.seed)
    device = (
        torch.device("cuda", context.get_local_rank()) if config.use_gpu else torch.device("cpu")
    )

    model = parallelize(Transformer(config.model).to(device), config)
    train = TokenBatches(
        config.data, manifest["shards"]["train"], rank, world, config.micro_batch_size, config.seed
    )
    val = TokenBatches(
        config.data, manifest["shards"]["val"], rank, world, config.micro_batch_size, config.seed
    )

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model.load(Path(folder))
            start_step = json.loads((Path(folder) / "progress.json").read_text())["step"]
        _log(rank, f"resumed from the checkpoint at step {start_step}")

    seq_len = manifest["seq_len"]
    tokens_per_step = world * config.micro_batch_size * config.grad_accum_steps * seq_len
    flops_per_token = config.model.flops_per_token(seq_len)
    peak = peak_tflops(config.peak_tflops_per_worker)
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum_steps):
            inputs, targets = train.get(step * config.grad_accum_steps + micro)
            loss = next_token_loss(model(inputs.to(device)), targets.to(device))
            model.backward(loss)
            model.step()
            loss_sum += loss.detach()
        loss_value = _mean_over_ranks(loss_sum / config.grad_accum_steps)
        metrics = {"step": step + 1, "loss": loss_value, "lr": model.learning_rate()}
        metrics |= step_metrics(
            tokens=tokens_per_step,
            seconds=time.perf_counter() - started,
            flops_per_token=flops_per_token,
            workers=world,
            peak=peak,
        )
        last = step + 1 == config.steps
        if (step + 1) % config.eval_every == 0 or last:
            metrics["val_loss"] = _evaluate(model, val, config, device)
        if (step + 1) % config.checkpoint_every == 0 or last:
            _report_checkpoint(model, metrics, config, rank, manifest, final=last)
        if (step + 1) % config.log_every == 0 or last:
            _log(rank, _format(metrics, config.steps))
            if (step + 1) % config.checkpoint_every and not last:
                ray.train.report(metrics)


def _evaluate(model, val: TokenBatches, config: TrainConfig, device: torch.device) -> float:
    model.train(False)
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for index in range(config.eval_batches):
            inputs, targets = val.get(index)
            total += next_token_loss(model(inputs.to(device)), targets.to(device))
    model.train(True)
    return _mean_over_ranks(total / config.eval_batches)


def _report_checkpoint(
    model, metrics: dict, config: TrainConfig, rank: int, manifest: dict, final: bool
) -> None:
    """Every rank writes its part (ZeRO shards, or rank 0 alone for DDP); Ray Train gathers them.

    The final checkpoint also holds ``hf/``: the consolidated model in Hugging Face format.
    """
    state = model.full_state_dict() if final else None  # a collective under ZeRO-3
    with tempfile.TemporaryDirectory(prefix="rayllm-ckpt-") as folder:
        folder_path = Path(folder)
        if model.every_rank_saves or rank == 0:
            model.save(folder_path)
        if rank == 0:
            (folder_path / "progress.json").write_text(json.dumps({"step": metrics["step"]}))
            if final:
                save_hf_model(
                    folder_path / "hf",
                    config.model,
                    state,
                    bos_token_id=manifest["eos_token_id"],
                    eos_token_id=manifest["eos_token_id"],
                )
        writes = model.every_rank_saves or rank == 0
        checkpoint = ray.train.Checkpoint.from_directory(folder) if writes else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value.item() / dist.get_world_size()


def _format(metrics: dict, steps: int) -> str:
    text = f"step {metrics['step']:>5}/{steps}  loss {metrics['loss']:.3f}"
    if "val_loss" in metrics:
        text += f"  val {metrics['val_loss']:.3f}"
    text += f"  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:,.0f} tok/s"
    text += f"  {metrics['tflops_per_worker']:.3f} TFLOP/s/worker"
    if "mfu" in metrics:
        text += f"  MFU {metrics['mfu']:.1%}"
    return text


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(f"[train] {text}", flush=True)


class _DropTrainReports(logging.Filter):
    """Ray Train logs every ``ray.train.report`` at INFO (under a logger named by its file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Reporting training result")


def _quiet_worker_logs() -> None:
    """Keep the driver's view to rayllm's own progress lines."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropTrainReports())
    warnings.filterwarnings("ignore", category=FutureWarning)
