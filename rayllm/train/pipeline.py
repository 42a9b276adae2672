"""Pipeline parallelism with ``torch.distributed.pipelining``: cut the model into stages by
layers, one stage per ``pp`` rank (two with interleaving), and drive micro-batches through a
GPipe, 1F1B or interleaved 1F1B schedule.

Each stage is the whole model with the parts other stages run deleted, so its parameters
keep the names they have in the whole model (checkpoints and consolidation rely on it). A head
tied to the embedding is held twice, by the first stage (the embedding) and the last (the
head); ``sum_tied_gradients`` keeps the two copies one matrix, as Megatron's embedding group
does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.tensor import DTensor

from rayllm.model.model import Transformer
from rayllm.train.config import ParallelConfig

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}


def stage_layers(n_layers: int, stages: int, index: int) -> range:
    """The layers of stage ``index``: contiguous, the first stages taking one more when
    the layers do not divide evenly."""
    size, extra = divmod(n_layers, stages)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def cut_stage(model: Transformer, index: int, stages: int) -> Transformer:
    """Keep the layers of stage ``index`` (plus the embedding on the first stage, the final
    norm and head on the last); delete the rest."""
    keep = {str(i) for i in stage_layers(len(model.layers), stages, index)}
    for name in [name for name in model.layers if name not in keep]:
        del model.layers[name]
    if index > 0:
        model.embed_tokens = None
    if index < stages - 1:
        model.norm = None
        model.lm_head = None
    return model


def end_stages_group(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """This rank's group of first- and last-stage peers (same data- and tensor-parallel
    coordinates), which hold the two copies of a tied embedding and head. Every rank creates
    every group, as ``new_group`` requires; ranks of middle stages belong to none."""
    ranks = mesh.mesh.reshape(mesh.mesh.shape[0], -1)
    mine = None
    for pair in zip(ranks[0].tolist(), ranks[-1].tolist(), strict=True):
        group = dist.new_group(list(pair))
        if dist.get_rank() in pair:
            mine = group
    return mine


def tied_copy(stage: nn.Module) -> nn.Parameter | None:
    """A pipeline stage's copy of a tied embedding and head, if it trains one: the first
    stage's embedding matrix, the last stage's head."""
    for end in (stage.embed_tokens, stage.lm_head):
        if end is not None and end.weight.requires_grad:
            return end.weight
    return None


def sum_tied_gradients(copies: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Both copies of the tied matrix get the sum of their gradients (the embedding's use and
    the head's), so that both take the same step from the same values: one matrix trained."""
    with torch.no_grad():
        for copy in copies:
            grad = copy.grad
            if isinstance(grad, DTensor):
                if grad.placements != copy.placements:  # the embedding's comes back whole
                    grad = copy.grad = grad.redistribute(copy.device_mesh, copy.placements)
                grad = grad.to_local()
            dist.all_reduce(grad, group=group)


def stage_indices(rank: int, ranks: int, per_rank: int) -> list[int]:
    """The stages of pipeline rank ``rank``: one, or with interleaving ``per_rank`` stages
    placed round-robin (rank 0 holds stages 0 and ``ranks``, ...), so the first stage and
    the last are on the first rank and the last."""
    return [rank + round_ * ranks for round_ in range(per_rank)]


def build_schedule(
    stages: list[tuple[int, nn.Module]],
    pp_mesh: DeviceMesh,
    device: torch.device,
    parallel: ParallelConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """The schedule over this rank's ``(stage index, module)`` pairs. Gradients are not
    rescaled by the schedule: ``loss_fn`` already divides by the number of micro-batches."""
    total = pp_mesh.size() * parallel.stages_per_rank
    pipeline_stages = [
        PipelineStage(module, index, total, device, group=pp_mesh.get_group())
        for index, module in stages
    ]
    schedule = SCHEDULES[parallel.pp_schedule]
    if parallel.pp_schedule == "interleaved_1f1b":
        stage_arg = pipeline_stages
    else:
        (stage_arg,) = pipeline_stages
    return schedule(
        stage_arg, n_microbatches=parallel.microbatches, loss_fn=loss_fn, scale_grads=False
    )
