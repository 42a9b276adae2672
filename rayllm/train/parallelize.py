"""Apply parallelism to a plain model from outside, over the device mesh (torchtitan's shape).

Order matters and follows torchtitan: tensor parallel first (it rewrites the linear layers'
weights as DTensors over the ``tp`` mesh), then activation recomputation per layer, then data
parallel: FSDP2 ``fully_shard`` per layer and at the root over ``dp_shard`` (or the 2-D
``dp_replicate x dp_shard`` mesh for HSDP), or DDP over ``dp_replicate``. Pipeline stages are
cut before this (``rayllm.train.pipeline``) and each stage is parallelized the same way.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from rayllm.model.model import Transformer
from rayllm.train.config import TrainConfig
from rayllm.train.mesh import MeshShape


def parallelize(
    model: Transformer, mesh: DeviceMesh, shape: MeshShape, config: TrainConfig
) -> nn.Module:
    """``model`` (a whole model or one pipeline stage) ready to train on this rank."""
    if shape.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], config.parallel.sequence_parallel)
    if config.recompute != "none":
        every = 1 if config.recompute == "full" else config.recompute_every
        apply_recompute(model, every)
    if shape.dp == 1 and not config.parallel.fsdp_offload:
        return model  # one data-parallel rank: nothing to replicate or shard
    if config.parallel.strategy == "ddp" and shape.tp == shape.pp == 1:
        return DistributedDataParallel(model, process_group=mesh["dp_replicate"].get_group())
    # FSDP2 over dp_shard; with dp_replicate > 1 it shards within groups and replicates
    # across them (HSDP). DDP under tensor or pipeline parallelism is the same with shard
    # groups of one: pure replication, which (unlike DistributedDataParallel) composes
    # with DTensor weights and with pipeline schedules.
    dims = ("dp_replicate", "dp_shard") if shape.dp_replicate > 1 else ("dp_shard",)
    apply_fsdp(model, mesh[dims], config)
    return model


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron-style: q/k/v and gate/up split by output (column-wise, whole heads per rank),
    o and down split by input (row-wise) so each block needs one all-reduce per half; the
    embedding split by vocabulary, the head by vocabulary and gathered (a tied head is the
    embedding's matrix, split the same way). With sequence
    parallelism the norms and residual stream are split along the sequence instead of
    replicated. What was frozen (LoRA's base) stays frozen."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    ends = {}
    if model.embed_tokens is not None:
        ends["embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=between_blocks
        )
    if model.lm_head is not None:
        ends["lm_head"] = ColwiseParallel(input_layouts=between_blocks, output_layouts=Replicate())
        if sequence_parallel:
            ends["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, ends)
    if model.config.tie_embeddings and model.embed_tokens is not None and model.lm_head is not None:
        # Both split the one [vocab, dim] matrix by vocabulary (Shard(0)); the plan gave each a
        # copy of its own, so tie them again: one matrix, its gradient the sum of both uses.
        model.lm_head.weight = model.embed_tokens.weight
    for block in model.layers.values():
        for name in COLUMN_WISE + ROW_WISE:
            split_projection(block.get_submodule(name), tp_mesh, name in ROW_WISE, between_blocks)
        if sequence_parallel:
            plan = {
                "input_layernorm": SequenceParallel(),
                "post_attention_layernorm": SequenceParallel(),
                "self_attn": PrepareModuleInput(  # x, cos, sin, mask
                    input_layouts=(Shard(1), None, None, None),
                    desired_input_layouts=(Replicate(), None, None, None),
                ),
                "mlp": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
            }
            parallelize_module(block, tp_mesh, plan)
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)  # SequenceParallel makes the norms trainable


COLUMN_WISE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
)
ROW_WISE = ("self_attn.o_proj", "mlp.down_proj")


def split_projection(
    layer: nn.Module, tp_mesh: DeviceMesh, row_wise: bool, between_blocks: Placement
) -> None:
    """One projection split over the ``tp`` ranks: column-wise by output, row-wise by input
    with its output all-reduced (or reduce-scattered along the sequence) to ``between_blocks``.

    A LoRA-adapted projection (peft's ``base_layer`` + ``lora_B(lora_A(x))``) splits its base
    the same way, and its adapter so the two sums meet in the same layout: column-wise, A is
    replicated and B split by output; row-wise, A is split by input (its small ``r``-wide
    output all-reduced like the base's) and B replicated. The replicated halves are DTensors,
    so their gradients are summed over the ranks that share them."""
    split = RowwiseParallel(output_layouts=between_blocks) if row_wise else ColwiseParallel()
    if not hasattr(layer, "base_layer"):
        parallelize_module(layer, tp_mesh, split)
        return
    parallelize_module(layer.base_layer, tp_mesh, split)
    for adapter in layer.lora_A:
        if row_wise:
            adapter_in = RowwiseParallel(output_layouts=between_blocks, use_local_output=False)
            parallelize_module(layer.lora_A[adapter], tp_mesh, adapter_in)
            distribute_module(layer.lora_B[adapter], tp_mesh, output_fn=_local)
        else:
            distribute_module(layer.lora_A[adapter], tp_mesh, input_fn=_replicated)
            parallelize_module(layer.lora_B[adapter], tp_mesh, ColwiseParallel())


def _replicated(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    """A replicated input as a DTensor (under sequence parallelism it is one already)."""
    x = inputs[0]
    if isinstance(x, DTensor):
        return (x, *inputs[1:])
    return (DTensor.from_local(x, mesh, [Replicate()], run_check=False), *inputs[1:])


def _local(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.to_local()


def apply_recompute(model: Transformer, every: int) -> None:
    """Recompute every ``every``-th layer's activations in the backward pass instead of keeping
    them. The layer's ``forward`` is wrapped in place, so parameter names do not change."""
    for index, block in enumerate(model.layers.values()):
        if index % every == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, config: TrainConfig) -> None:
    """FSDP2: each layer is one all-gather / reduce-scatter unit, the root holds the rest."""
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    options = {
        "mesh": dp_mesh,
        "mp_policy": mixed if config.precision == "bf16" else MixedPrecisionPolicy(),
        "offload_policy": (
            CPUOffloadPolicy(pin_memory=config.use_gpu)
            if config.parallel.fsdp_offload
            else OffloadPolicy()
        ),
    }
    for block in model.layers.values():
        fully_shard(block, **options)
    fully_shard(model, **options)
