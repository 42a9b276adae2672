"""What ``rayllm bench train`` and the layout tests compare: the layouts, the benchmark's
model, their names, whether a layout fits a run, and the ZeRO paper's memory figures.

Configuration only (no torch): the CLI checks a user's settings with it before it starts
anything.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from rayllm.config import describe_validation_error, parse_override
from rayllm.errors import RayllmError
from rayllm.model.config import ModelConfig
from rayllm.train.config import ParallelConfig, TrainConfig
from rayllm.train.mesh import mesh_shape

LAYOUTS: list[dict[str, Any]] = [
    {"strategy": "ddp"},
    {"strategy": "zero", "zero_stage": 1},
    {"strategy": "zero", "zero_stage": 2},
    {"strategy": "zero", "zero_stage": 3},
    {"strategy": "zero", "zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    {"strategy": "fsdp"},
    {"strategy": "fsdp", "fsdp_offload": True},
    {"strategy": "fsdp", "dp_replicate": 2},
    {"strategy": "fsdp", "tp": 2},
    {"strategy": "fsdp", "tp": 2, "sequence_parallel": True},
    {"strategy": "ddp", "pp": 2, "pp_schedule": "gpipe"},
    {"strategy": "fsdp", "pp": 2, "pp_schedule": "1f1b"},
    {"strategy": "fsdp", "pp": 2, "pp_schedule": "interleaved_1f1b"},
    {"strategy": "fsdp", "pp": 2, "tp": 2},
]
"""The layouts compared by default: each ZeRO stage and each torch strategy, alone and on
2-D and 3-D meshes (the data-parallel size is what the workers leave)."""


def theory_mb(parallel: dict[str, Any], params: int, workers: int) -> float | None:
    """Bytes per rank of parameters + gradients + optimizer state in fp32 with Adam by the ZeRO
    paper's accounting, for data-parallel layouts: 4 bytes of parameters, 4 of gradients, 8 of
    moments per parameter, and 4 more of fp32 master weights where DeepSpeed keeps them, each
    divided by the data-parallel size where the layout shards it."""
    config = ParallelConfig.model_validate(parallel)
    if config.tp > 1 or config.pp > 1:
        return None
    n = workers
    per_param = {
        "ddp": 16,
        "fsdp": 16 / (n // config.dp_replicate),  # HSDP shards within a replica group
        "zero": [16, 4 + 4 + 12 / n, 4 + 16 / n, 20 / n][config.zero_stage],
    }[config.strategy]
    return per_param * params / 2**20


def layout_name(layout: dict[str, Any], workers: int) -> str:
    """``fsdp x tp2 (dp 2)``: the strategy and the data-parallel size it gets, ``+ LoRA``
    where the layout trains adapters only (its ``lora`` settings)."""
    config = ParallelConfig.model_validate(parallel_settings(layout))
    name = f"{config.describe()} (dp {workers // (config.tp * config.pp)})"
    return f"{name} + LoRA" if layout.get("lora") else name


def parallel_settings(layout: dict[str, Any]) -> dict[str, Any]:
    """A layout's ``parallel`` settings: everything but its ``lora``."""
    return {key: value for key, value in layout.items() if key != "lora"}


BENCH_MODEL = {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 1408}
"""About 28 M parameters with a 4,096-token vocabulary: big enough that the matmuls, not the
framework, take the time."""


def bench_model(overrides: list[str]) -> dict[str, Any]:
    """:data:`BENCH_MODEL` with ``key=value`` overrides (``dim=1024``), checked as a model."""
    model = dict(BENCH_MODEL)
    for text in overrides:
        path, value = parse_override(text)
        model[".".join(path)] = value
    try:
        ModelConfig.model_validate(model)
    except ValidationError as err:
        raise RayllmError(describe_validation_error(err, source="--set")) from None
    return model


def fits(layout: dict[str, Any], workers: int, global_batch: int, model: dict[str, Any]) -> bool:
    """Whether ``layout`` has a mesh for ``model`` on ``workers`` ranks that splits
    ``global_batch`` (the layouts that do not are left out of the benchmark)."""
    parallel = parallel_settings(layout)
    dp = workers // (parallel.get("tp", 1) * parallel.get("pp", 1)) or 1
    settings = {"model": model, "parallel": parallel, "num_workers": workers}
    try:
        mesh_shape(TrainConfig.model_validate(settings | {"micro_batch_size": global_batch // dp}))
    except (RayllmError, ValueError):
        return False
    return global_batch % dp == 0
