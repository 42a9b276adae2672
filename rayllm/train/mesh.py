"""The device mesh every torch strategy runs on: ``pp x dp_replicate x dp_shard x tp``.

The sizes come from the config and the worker count; :func:`mesh_shape` checks that they
fit the model and the batch before any worker starts, so a bad layout is one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rayllm.errors import RayllmError
from rayllm.train.config import TrainConfig

if TYPE_CHECKING:  # torch is imported where a mesh is built, so the CLI checks shapes quickly
    from torch.distributed.device_mesh import DeviceMesh

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class MeshShape:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp(self) -> int:
        """Data-parallel ranks: how many different micro-batches each step sees."""
        return self.dp_replicate * self.dp_shard

    def __str__(self) -> str:
        return " x ".join(f"{name} {size}" for name, size in zip(DIMS, self.sizes, strict=True))

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)

    def dp_rank(self, rank: int) -> int:
        """Which data-parallel slice global ``rank`` reads (ranks run ``tp`` fastest)."""
        return (rank // self.tp) % self.dp


def mesh_shape(config: TrainConfig) -> MeshShape:
    """The mesh for ``config``, or a :class:`RayllmError` naming what does not fit."""
    parallel, model, workers = config.parallel, config.model, config.num_workers
    if workers % (parallel.tp * parallel.pp):
        raise RayllmError(
            f"num_workers ({workers}) is not a multiple of parallel.tp x parallel.pp "
            f"({parallel.tp} x {parallel.pp}); the data-parallel size is what remains"
        )
    dp = workers // (parallel.tp * parallel.pp)
    if dp % parallel.dp_replicate:
        raise RayllmError(
            f"the {dp} data-parallel ranks do not split into parallel.dp_replicate = "
            f"{parallel.dp_replicate} groups"
        )
    for name, count in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads)):
        if count % parallel.tp:
            raise RayllmError(
                f"model.{name} ({count}) is not divisible by parallel.tp ({parallel.tp}): "
                "every tensor-parallel rank needs whole heads"
            )
    if model.ffn_dim % parallel.tp:
        raise RayllmError(f"model.ffn_dim ({model.ffn_dim}) is not divisible by parallel.tp")
    stages = parallel.pp * parallel.stages_per_rank
    if model.n_layers < stages:
        raise RayllmError(
            f"model.n_layers ({model.n_layers}) is fewer than the {stages} pipeline stages of "
            f"parallel.pp = {parallel.pp} with the {parallel.pp_schedule} schedule"
        )
    if parallel.pp > 1 and config.micro_batch_size % parallel.microbatches:
        raise RayllmError(
            f"micro_batch_size ({config.micro_batch_size}) does not split into "
            f"parallel.pp_microbatches ({parallel.microbatches}) equal pipeline micro-batches"
        )
    if parallel.strategy == "fsdp":
        return MeshShape(
            parallel.pp, parallel.dp_replicate, dp // parallel.dp_replicate, parallel.tp
        )
    return MeshShape(parallel.pp, dp, 1, parallel.tp)


def build_mesh(shape: MeshShape, device_type: str) -> DeviceMesh:
    """One mesh over all ranks; strategies take the sub-meshes they need by name."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, shape.sizes, mesh_dim_names=DIMS)
