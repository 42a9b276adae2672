"""DeepSpeed ZeRO behind the engine interface: it owns accumulation, clipping and the schedule."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

from rayllm.train.batches import Batch
from rayllm.train.config import TrainConfig
from rayllm.train.engine import build_model, held_out_objective, model_inputs, objective
from rayllm.train.metrics import held_bytes, optimizer_state_bytes
from rayllm.train.optim import BETAS, build_optimizer, lr_schedule, param_groups

TAG = "state"
"""The folder DeepSpeed writes a checkpoint's shards to, inside a Ray Train checkpoint."""


def use_this_environments_ninja() -> None:
    """Put this interpreter's scripts folder first on PATH, so DeepSpeed's C++ ops build with
    the ``ninja`` pip installed beside it, as ``cluster/install.sh`` built them into the cache.

    Ninja versions record a build's command line under different hashes: a system ninja found
    first sees every op another version built as changed and compiles it again (a minute or
    two per op on a small machine, in every process whose PATH differs)."""
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != scripts:
        os.environ["PATH"] = os.pathsep.join([scripts, path]) if path else scripts


class DeepSpeedEngine:
    def __init__(self, config: TrainConfig, device: torch.device):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if config.use_gpu else "cpu")
        use_this_environments_ninja()
        import deepspeed

        model = build_model(config, device)
        parallel = config.parallel
        # Bucket sizes follow the model (Hugging Face's "auto" values) instead of DeepSpeed's
        # fixed 5e8 elements, which ZeRO-3 allocates up front: 2 GB for any model size.
        dim = config.model.dim
        zero: dict = {
            "stage": parallel.zero_stage,
            "reduce_bucket_size": dim * dim,
            "stage3_prefetch_bucket_size": int(0.9 * dim * dim),
            "stage3_param_persistence_threshold": 10 * dim,
        }
        if parallel.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if parallel.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        if parallel.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                param_groups([model], config.weight_decay),
                lr=config.learning_rate,
                betas=BETAS,
                adamw_mode=True,
            )
        else:
            optimizer = build_optimizer([model], config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
        ds_config = {
            "train_micro_batch_size_per_gpu": config.micro_batch_size,
            "gradient_accumulation_steps": config.grad_accum_steps,
            "gradient_clipping": config.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": config.precision == "bf16"},
            "fp16": {"enabled": config.precision == "fp16"},
            "steps_per_print": 1 << 30,
            "zero_allow_untested_optimizer": True,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.stage = parallel.zero_stage
        self.objective = objective(config, device)
        self.held_out = held_out_objective(config)
        self.memory: dict[str, int] = {}

    def train_step(self, batches: list[Batch]) -> tuple[torch.Tensor, float]:
        total = torch.zeros((), device=self.engine.device)
        for batch in batches:
            loss = self.objective(self.engine(*model_inputs(batch)), batch)
            self.engine.backward(loss)  # scaled by 1 / accumulation steps inside
            # the state is allocated by the first step, then stays that size
            if not self.memory and self.engine.is_gradient_accumulation_boundary():
                self.memory = zero_state_bytes(self.engine, self.stage)
            self.engine.step()  # a no-op until the last micro-batch of the window
            total += loss.detach()
        if "optimizer" not in self.memory:
            self.memory["optimizer"] = optimizer_state_bytes([_torch_optimizer(self.engine)])
        norm = self.engine.get_global_grad_norm()
        return total / len(batches), float(norm) if norm is not None else float("nan")

    def evaluate(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return self.held_out(self.engine(*model_inputs(batch)), batch)

    def forward(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return self.engine(*model_inputs(batch))

    def learning_rate(self) -> float:
        return self.engine.get_lr()[0]

    def held_memory(self) -> dict[str, int]:
        return self.memory

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=TAG)

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag=TAG)


def zero_state_bytes(engine, stage: int) -> dict[str, int]:
    """Bytes of parameters (the model's and the fp32 master partition) and gradients a rank
    holds under ZeRO, read from DeepSpeed 0.19's optimizer attributes: an adapter over
    DeepSpeed internals, pinned by the strategy tests' memory check."""
    optimizer = engine.optimizer
    if stage == 0:
        params = list(engine.module.parameters())
        return {"params": held_bytes(params), "grads": held_bytes(p.grad for p in params)}
    if stage in (1, 2):
        params = [*optimizer.bit16_groups_flat, *optimizer.single_partition_of_fp32_groups]
        grads = [g for group in optimizer.averaged_gradients.values() for g in group or []]
        grads += [master.grad for master in optimizer.single_partition_of_fp32_groups]  # offload
        return {"params": held_bytes(params), "grads": held_bytes(grads)}
    params = [*optimizer.fp16_partitioned_groups_flat, *optimizer.fp32_partitioned_groups_flat]
    return {
        "params": held_bytes(params),
        "grads": held_bytes([optimizer.grad_partitions_flat_buffer]),
    }


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer whose state holds the moments: ZeRO wraps it, stage 0 does not."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)
