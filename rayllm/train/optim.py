"""AdamW over decayed and undecayed parameter groups, the learning-rate schedules, and
gradient clipping whose norm spans every shard and pipeline stage."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from rayllm.train.config import TrainConfig

BETAS = (0.9, 0.95)


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on norms; frozen parameters (LoRA's base) left out,
    and with them a group left empty."""
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]  # DeepSpeed drops empty groups


def build_optimizer(modules: Iterable[nn.Module], config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(modules, config.weight_decay), lr=config.learning_rate, betas=BETAS
    )


def lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """The factor on ``learning_rate`` at each step (for ``LambdaLR``): linear warm-up, then
    cosine decay to ``min_learning_rate``, or warmup-stable-decay: constant, then linear to
    ``min_learning_rate`` over the last ``decay_fraction`` of the steps."""
    floor = config.min_learning_rate / config.learning_rate
    if config.lr_schedule == "cosine":
        return warmup_cosine(config.steps, config.warmup, floor)
    decay_start = config.steps - max(1, round(config.decay_fraction * config.steps))

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        if step < max(decay_start, config.warmup):
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, config.steps - decay_start))
        return 1 - (1 - floor) * progress

    return factor


def warmup_cosine(steps: int, warmup: int, floor: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 down to ``floor`` at
    ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def clip_grad_norm(
    params: list[nn.Parameter],
    max_norm: float,
    pp_group: dist.ProcessGroup | None,
    counted_elsewhere: Sequence[nn.Parameter] = (),
) -> float:
    """Clip to ``max_norm`` by the norm over all gradients of the model, wherever they live:
    sharded or tensor-parallel gradients (DTensors) reduce over their mesh, and pipeline
    stages add their parts over ``pp_group``; ``counted_elsewhere`` are clipped but counted by
    another stage (the second copy of a tied matrix). Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    elsewhere = {id(p) for p in counted_elsewhere}
    counted = [p.grad for p in params if p.grad is not None and id(p) not in elsewhere]
    squared = sum((norm**2 for norm in _group_norms(counted)), torch.zeros(()))
    if pp_group is not None:
        dist.all_reduce(squared, group=pp_group)
    norm = squared.sqrt().item()
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return norm


def _group_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The norm of each group of gradients that one fused kernel can take: plain tensors
    together, DTensors per device mesh (as full values, reduced over the mesh)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        key = id(grad.device_mesh) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return [norm.float().cpu() for norm in norms]
