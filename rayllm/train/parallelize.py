"""Apply a parallelism strategy to a plain model: DeepSpeed ZeRO or PyTorch DDP.

Both return a :class:`ParallelModel` with the same small surface (forward, backward, step,
save / load, full state dict), so the training loop does not know which one it drives.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rayllm.train.config import TrainConfig


class ParallelModel(Protocol):
    every_rank_saves: bool
    """True when each rank writes its own shard of a checkpoint (ZeRO), else rank 0 alone."""

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def learning_rate(self) -> float: ...
    def train(self, mode: bool = True) -> None: ...
    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


def lr_schedule(config: TrainConfig):
    """Linear warm-up, then cosine decay to ``min_learning_rate`` (as a LambdaLR factor)."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
        floor = config.min_learning_rate / config.learning_rate
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class DeepSpeedModel:
    """DeepSpeed ZeRO engine; it owns gradient accumulation, clipping and the schedule."""

    every_rank_saves = True

    def __init__(self, model: nn.Module, config: TrainConfig):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if config.use_gpu else "cpu")
        import deepspeed

        zero: dict = {"stage": config.parallel.zero_stage}
        if config.parallel.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                _param_groups(model, config.weight_decay),
                lr=config.learning_rate,
                betas=(0.9, 0.95),
                adamw_mode=True,
            )
        else:
            optimizer = torch.optim.AdamW(
                _param_groups(model, config.weight_decay),
                lr=config.learning_rate,
                betas=(0.9, 0.95),
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
        ds_config = {
            "train_micro_batch_size_per_gpu": config.micro_batch_size,
            "gradient_accumulation_steps": config.grad_accum_steps,
            "gradient_clipping": config.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": config.precision == "bf16"},
            "steps_per_print": 1 << 30,
            "zero_allow_untested_optimizer": True,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.stage = config.parallel.zero_stage

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.engine(tokens)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # a no-op until the last micro-batch of an accumulation window

    def learning_rate(self) -> float:
        return self.engine.get_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="state")

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag="state")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank must call this: ZeRO-3 gathers the partitioned parameters."""
        module = self.engine.module
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}


class DDPModel:
    """PyTorch DDP with AdamW; accumulation, clipping and the schedule done here."""

    every_rank_saves = False

    def __init__(self, model: nn.Module, config: TrainConfig):
        import ray.train.torch

        self.module = ray.train.torch.prepare_model(model)
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay), lr=config.learning_rate, betas=(0.9, 0.95)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(config))
        self.accum, self.clip, self.micro = config.grad_accum_steps, config.grad_clip, 0
        self.autocast = config.precision == "bf16"

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        device = "cuda" if tokens.is_cuda else "cpu"
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(tokens)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            return
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def _plain(self) -> nn.Module:
        return getattr(self.module, "module", self.module)

    def save(self, folder: Path) -> None:
        state = {
            "model": self._plain().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, folder / "state.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        self._plain().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self._plain().state_dict().items()}


def parallelize(model: nn.Module, config: TrainConfig) -> DeepSpeedModel | DDPModel:
    """Wrap ``model`` for the strategy ``config.parallel`` names."""
    if config.parallel.strategy == "zero":
        return DeepSpeedModel(model, config)
    return DDPModel(model, config)
