"""Pipeline parallelism with ``torch.distributed.pipelining``: cut the model into stages by
layers, one stage per ``pp`` rank, and drive micro-batches through a GPipe or 1F1B schedule.

Each stage is the whole model with the parts other stages run deleted, so its parameters
keep the names they have in the whole model (checkpoints and consolidation rely on it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from rayllm.model.model import Transformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


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


def build_schedule(
    stage_module: nn.Module,
    pp_mesh: DeviceMesh,
    device: torch.device,
    kind: str,
    microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """The schedule for this rank's stage. Gradients are not rescaled by the schedule:
    ``loss_fn`` already divides by the number of micro-batches."""
    stage = PipelineStage(
        stage_module, pp_mesh.get_local_rank(), pp_mesh.size(), device, group=pp_mesh.get_group()
    )
    return SCHEDULES[kind](stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
