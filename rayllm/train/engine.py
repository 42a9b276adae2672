"""The training engines behind one small interface: PyTorch over the device mesh (DDP,
FSDP2, tensor and pipeline parallel and their combinations) or DeepSpeed ZeRO.

An engine owns the model, the optimizer and the schedule; the loop hands it the micro-batches
of one optimizer step and gets back the loss, so it does not know which strategy it drives.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from rayllm.errors import RayllmError
from rayllm.model.hf import read_hf_model
from rayllm.model.model import Transformer
from rayllm.train.adapters import with_adapters
from rayllm.train.batches import Batch
from rayllm.train.config import TrainConfig
from rayllm.train.mesh import MeshShape, build_mesh
from rayllm.train.metrics import held_bytes, optimizer_state_bytes
from rayllm.train.objectives import (
    Objective,
    distillation,
    dpo,
    language_modelling,
    loss_units,
)
from rayllm.train.optim import build_optimizer, clip_grad_norm, lr_schedule
from rayllm.train.parallelize import parallelize
from rayllm.train.pipeline import (
    build_schedule,
    cut_stage,
    end_stages_group,
    stage_indices,
    sum_tied_gradients,
    tied_copy,
)


class Engine(Protocol):
    def train_step(self, batches: list[Batch]) -> tuple[torch.Tensor, float]:
        """One optimizer step over the micro-batches of an accumulation window: the mean loss
        of this data-parallel rank's batches (on every rank) and the gradient norm."""

    def evaluate(self, batch: Batch) -> torch.Tensor:
        """The loss of ``batch``, without gradients, on every rank."""

    def forward(self, batch: Batch) -> torch.Tensor | None:
        """The logits of ``batch``, without gradients; with pipeline parallelism on the last
        stage only (None on the others)."""

    def learning_rate(self) -> float: ...

    def held_memory(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank held at the first step
        (where they are allocated; they stay that size)."""

    def save(self, folder: Path) -> None:
        """Every rank calls this and writes its own part of the checkpoint into ``folder``."""

    def load(self, folder: Path) -> None:
        """Every rank reads its part back from the whole checkpoint in ``folder``."""


def build_model(config: TrainConfig, device: torch.device) -> Transformer:
    """The model a run trains: a seeded random init (the same on every rank) or the weights of
    ``init_from``; with ``lora`` or ``prompt``, what they train added and everything else
    frozen."""
    model = Transformer(config.model)
    if config.init_from:
        shape, state = read_hf_model(config.init_from)
        if shape.tie_embeddings and not config.model.tie_embeddings:
            shape = shape.model_copy(update={"tie_embeddings": False})  # head: the embedding's copy
        if shape != config.model:
            raise RayllmError(
                f"train.init_from {config.init_from} has the shape {shape}, not train.model's"
            )
        model.load_state_dict(state)
    return with_adapters(model, config.lora, config.prompt).to(device)


def objective(config: TrainConfig, device: torch.device) -> Objective:
    """What training minimises; for distillation, with a frozen copy of the teacher."""
    if config.objective == "distill":
        teacher = build_teacher(config, device)
        return distillation(
            lambda batch: teacher(*model_inputs(batch)),
            config.distill_alpha,
            config.distill_temperature,
        )
    return held_out_objective(config)


def held_out_objective(config: TrainConfig) -> Objective:
    """What evaluation measures: the training objective, but the next-token loss alone for
    distillation, so a distilled model's held-out loss compares with any other's."""
    return dpo(config.dpo_beta) if config.objective == "dpo" else language_modelling


def build_teacher(config: TrainConfig, device: torch.device) -> nn.Module:
    """``config.teacher``'s weights in rayllm's model, frozen, in the run's compute dtype."""
    shape, state = read_hf_model(config.teacher)
    if shape.vocab_size != config.model.vocab_size:
        raise RayllmError(
            f"train.teacher {config.teacher} predicts {shape.vocab_size} tokens but the model "
            f"{config.model.vocab_size}; set train.model.vocab_size to {shape.vocab_size} "
            "(the teacher and the data must share one tokenizer)"
        )
    teacher = Transformer(shape)
    teacher.load_state_dict(state)
    return teacher.requires_grad_(False).eval().to(device, compute_dtype(config.precision))


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of a run at ``precision`` compute in."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def model_inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    """What the model takes of a batch: the token ids, and the segments of packed examples."""
    return tuple(batch[0:1]) + tuple(batch[2:3])


def build_engine(config: TrainConfig, shape: MeshShape, device: torch.device) -> Engine:
    if config.parallel.strategy == "zero":
        from rayllm.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(config, device)
    return TorchEngine(config, shape, device)


class TorchEngine:
    """PyTorch-native strategies over one ``pp x dp_replicate x dp_shard x tp`` mesh.

    The model is held as parts: the whole model, or this rank's pipeline stages (one, or
    several with interleaved 1F1B), each parallelized and with its own optimizer, as in
    torchtitan; their parameter names are the whole model's, so checkpoints merge them.
    """

    def __init__(self, config: TrainConfig, shape: MeshShape, device: torch.device):
        mesh = build_mesh(shape, device.type)
        model = build_model(config, device)
        self.pp_group, self.schedule = None, None
        stages: list[tuple[int, nn.Module]] = [(0, model)]
        if shape.pp > 1:
            pp_mesh = mesh["pp"]
            self.pp_group = pp_mesh.get_group()
            rank, total = pp_mesh.get_local_rank(), shape.pp * config.parallel.stages_per_rank
            stages = [
                (index, cut_stage(copy.deepcopy(model), index, total))
                for index in stage_indices(rank, shape.pp, config.parallel.stages_per_rank)
            ]
            self.first_stage, self.last_stage = rank == 0, rank == shape.pp - 1
        self.parts = [parallelize(part, mesh, shape, config) for _, part in stages]
        self.tied_group, self.tied_copies = None, []
        if shape.pp > 1 and config.model.tie_embeddings:
            self.tied_group = end_stages_group(mesh)
            self.tied_copies = [c for c in map(tied_copy, self.parts) if c is not None]
        self.optimizers = [build_optimizer([part], config) for part in self.parts]
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
            for optimizer in self.optimizers
        ]
        self.accum, self.grad_clip = config.grad_accum_steps, config.grad_clip
        self.held_out = held_out_objective(config)
        # The loss is computed where the logits are, on the last pipeline stage: a
        # distillation teacher is built there only (other stages never call the objective).
        computes_loss = shape.pp == 1 or self.last_stage
        self.objective = objective(config, device) if computes_loss else self.held_out
        # bf16 compute: FSDP2's mixed-precision policy where FSDP2 wraps the model, else autocast.
        fsdp = isinstance(self.parts[0], FSDPModule)
        self.autocast = config.precision == "bf16" and not fsdp
        self.device = device
        self.memory: dict[str, int] = {}
        if shape.pp > 1:
            self.schedule = build_schedule(
                [(index, part) for (index, _), part in zip(stages, self.parts, strict=True)],
                pp_mesh,
                device,
                config.parallel,
                loss_fn=self._microbatch_loss,
            )

    def parameters(self) -> list[nn.Parameter]:
        return [param for part in self.parts for param in part.parameters()]

    def train_step(self, batches: list[Batch]) -> tuple[torch.Tensor, float]:
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(batches):
            with self._gradient_sync(last=index == len(batches) - 1):
                total += self._forward_backward(batch)
        if self.tied_copies:
            sum_tied_gradients(self.tied_copies, self.tied_group)
        params = self.parameters()
        # The tied matrix counts once in the norm: the first stage's copy.
        held_twice = self.tied_copies if self.tied_copies and self.last_stage else []
        norm = clip_grad_norm(params, self.grad_clip, self.pp_group, held_twice)
        first = not self.memory  # the state is allocated by the first step, then steady
        if first:
            self.memory = {
                "params": held_bytes(params),
                "grads": held_bytes(p.grad for p in params),
            }
        for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            optimizer.step()
            scheduler.step()
        if first:
            self.memory["optimizer"] = optimizer_state_bytes(self.optimizers)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return self._from_last_stage(total / len(batches)), norm

    def evaluate(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            if self.schedule is None:
                with self._precision():
                    return self.held_out(self.parts[0](*model_inputs(batch)), batch)
            losses: list[torch.Tensor] = []
            with self._precision():
                self._run_pipeline(batch, self.schedule.eval, self.held_out, losses)
            loss = sum(losses) * self.accum if losses else torch.zeros((), device=self.device)
            return self._from_last_stage(loss)

    def forward(self, batch: Batch) -> torch.Tensor | None:
        with torch.no_grad(), self._precision():
            if self.schedule is None:
                return self.parts[0](*model_inputs(batch))
            # The schedule computes a loss on the last stage; the next-token one needs nothing
            # more than any batch holds (DPO's needs the reference this may be computing).
            return self._run_pipeline(
                batch, self.schedule.eval, language_modelling, [], outputs=True
            )

    def learning_rate(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def held_memory(self) -> dict[str, int]:
        return self.memory

    def save(self, folder: Path) -> None:
        state, _ = self._state()
        dcp.save(state, checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        state, keys = self._state()
        dcp.load(state, checkpoint_id=str(folder))
        for part, optimizer, (model_keys, optimizer_keys) in zip(
            self.parts, self.optimizers, keys, strict=True
        ):
            set_state_dict(
                part,
                optimizer,
                model_state_dict={k: state["model"][k] for k in model_keys},
                optim_state_dict={k: state["optimizer"][k] for k in optimizer_keys},
                options=_OPTIONS,
            )
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state["scheduler"])

    def _state(self) -> tuple[dict, list[tuple[list[str], list[str]]]]:
        """The parts' states merged under their whole-model names, and each part's keys."""
        state: dict = {"model": {}, "optimizer": {}, "scheduler": self.schedulers[0].state_dict()}
        keys = []
        for part, optimizer in zip(self.parts, self.optimizers, strict=True):
            model, optim = get_state_dict(part, optimizer, options=_OPTIONS)
            state["model"] |= model
            state["optimizer"] |= optim
            keys.append((list(model), list(optim)))
        return state, keys

    def _forward_backward(self, batch: Batch) -> torch.Tensor:
        """This micro-batch's loss; its gradients, divided by the accumulation steps, added."""
        if self.schedule is None:
            with self._precision():
                loss = self.objective(self.parts[0](*model_inputs(batch)), batch)
            (loss / self.accum).backward()
            return loss.detach()
        losses: list[torch.Tensor] = []
        with self._precision():
            self._run_pipeline(batch, self.schedule.step, self.objective, losses)
        return sum(losses).detach() * self.accum if losses else torch.zeros((), device=self.device)

    def _run_pipeline(
        self, batch: Batch, run, objective: Objective, losses: list, outputs: bool = False
    ) -> torch.Tensor | None:
        """The first stage feeds the token ids; every stage is given the segments of packed
        examples (its attention mask and positions); others relay. The last stage's target is
        the batch's row indices, which the schedule splits into micro-batches as it splits the
        rows, so the loss of each micro-batch reads its own rows of the whole batch (targets,
        segments, DPO's reference, the token ids a teacher reads). Returns the last stage's
        logits with ``outputs``."""
        inputs = (batch[0],) if self.first_stage else ()
        packed = {"segments": batch[2]} if len(batch) > 2 else {}
        if not self.last_stage:
            run(*inputs, **packed)
            return None
        return run(
            *inputs,
            target=torch.arange(len(batch[0]), device=batch[0].device),
            losses=losses,
            return_outputs=outputs,
            loss_kwargs={"batch": batch, "units": loss_units(batch), "objective": objective},
            **packed,
        )

    def _microbatch_loss(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor,
        batch: Batch,
        units: torch.Tensor,
        objective: Objective,
    ) -> torch.Tensor:
        """A micro-batch's share of the whole batch's loss: its own loss weighted by its share
        of the ``units`` the batch's loss averages over (trained targets, or DPO's pairs), so
        the shares add up to the batch's loss however those fall over the micro-batches
        (fine-tuning trains on responses only), divided by the accumulation steps as the other
        engines' losses are."""
        mine = tuple(part[rows] for part in batch)
        share = loss_units(mine)
        if share == 0:  # nothing to learn from in these rows: no loss, no gradient
            return logits.sum() * 0.0
        return objective(logits, mine) * share / units / self.accum

    def _from_last_stage(self, loss: torch.Tensor) -> torch.Tensor:
        """Pipelines know the loss on their last stage only; share it with the others."""
        if self.pp_group is not None:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.pp_group)
        return loss

    def _precision(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _gradient_sync(self, last: bool):
        """Data-parallel gradients are reduced once per accumulation window, not per micro-batch."""
        if isinstance(self.parts[0], DistributedDataParallel) and not last:
            return self.parts[0].no_sync()  # DDP wraps whole models only: one part
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(last)
        return contextlib.nullcontext()


_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
