"""Every knob of the training stage, in one typed config."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from rayllm.config import StageConfig
from rayllm.model.model import ModelConfig


class ParallelConfig(StageConfig):
    """How the model is spread over the workers.

    ``zero`` is DeepSpeed ZeRO (stage 1 shards optimizer state, 2 also gradients, 3 also
    parameters); ``ddp`` is PyTorch DistributedDataParallel, every worker holding everything.
    """

    strategy: Literal["zero", "ddp"] = "zero"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload); uses DeepSpeed's CPU Adam."""

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.offload_optimizer and (self.strategy != "zero" or self.zero_stage == 0):
            raise ValueError("offload_optimizer needs strategy 'zero' with zero_stage 1, 2 or 3")
        return self


class TrainConfig(StageConfig):
    work_paths: ClassVar[dict[str, str]] = {"data": "data", "output": "model", "storage": "runs"}

    data: str | None = None
    """The folder (or fsspec URL) of a finished `rayllm data` run; default rayllm-work/data
    (in the lifecycle: what its data stage wrote)."""
    output: str | None = None
    """Where the trained model goes, in Hugging Face format with its tokenizer and chat
    template; default rayllm-work/model."""
    overwrite: bool = False
    """Replace ``output`` even when it holds something rayllm did not write."""
    storage: str | None = None
    """Where Ray Train keeps checkpoints and results (any fsspec URL Ray Train accepts);
    default rayllm-work/runs."""
    run_name: str = "rayllm-pretrain"
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    steps: int = 300
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int | None = None
    """Linear warm-up steps; default: a tenth of ``steps``."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 1
    """Restarts from the latest checkpoint after a worker dies."""
    peak_tflops_per_worker: float | None = None
    """Peak dense TFLOP/s of one worker's device, for MFU; known GPUs are looked up."""
    timeout_s: int = 600
    """Collective-operation timeout: a hung worker fails the run instead of stalling it."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps < 1 or self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("steps, micro_batch_size and grad_accum_steps must be at least 1")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be at least 0 and below steps "
                f"({self.steps}); lower warmup_steps or leave it unset (a tenth of steps)"
            )
        return self

    @property
    def warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps
