"""vLLM's CPU LoRA ops, made to leave base-model rows alone.

On CPU, vLLM 0.29 applies adapters with plain PyTorch ops (``vllm.lora.ops.torch_ops``) that
gather each row's adapter weights by slot index. A row of a base-model request carries slot -1;
the GPU kernels skip it, but a tensor index of -1 picks the last slot, so a base-model request
batched with adapter requests is answered with the last loaded adapter's weights, silently
(vLLM pull request 48421, open). ``skip_base_rows`` wraps the three gathering ops so rows of
slot -1 come out as they went in, as on GPU, and every other row bit for bit as before.

``install`` is a vLLM general plugin (entry point ``vllm.general_plugins`` in rayllm's package
metadata), so vLLM runs it in each process of every engine in this environment. It patches only
ops that show the fault on a probe, so a vLLM that fixes them is left as it is. The modules it
patches are vLLM's private ones; ``tests/serve/test_cpu_lora_ops.py`` pins them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch

GATHERING_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
"""The ops that index the stacked adapter weights by each row's slot; the ``sgmv_*`` ones call
these through their module."""


def skip_base_rows(op: Callable[..., None]) -> Callable[..., None]:
    """``op`` (``inputs, weights, output, slots, ...``, writing into ``output``), leaving the
    rows whose slot is -1 as they were."""

    @functools.wraps(op)
    def gather_adapter_rows_only(inputs, weights, output, slots, *args, **kwargs):
        base_rows = slots < 0
        if not base_rows.any():
            return op(inputs, weights, output, slots, *args, **kwargs)
        if base_rows.all():
            return None  # no row has an adapter: the GPU kernels return at once too
        rows = output[: slots.shape[0]]
        kept = rows[base_rows]
        op(inputs, weights, output, slots.clamp(min=0), *args, **kwargs)
        rows[base_rows] = kept
        return None

    gather_adapter_rows_only.skips_base_rows = True
    return gather_adapter_rows_only


def applies_an_adapter_to_base_rows(shrink: Callable[..., None]) -> bool:
    """Whether ``shrink`` gives a row of slot -1 an adapter's product (the fault)."""
    output = torch.zeros(1, 1)
    shrink(torch.ones(1, 1), torch.ones(2, 1, 1, 1), output, torch.tensor([-1]))
    return bool(output.any())


def install() -> None:
    """Patches vLLM's CPU LoRA ops where they show the fault; idempotent (vLLM may load its
    plugins more than once in one process)."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "skips_base_rows", False):
        return
    if not applies_an_adapter_to_base_rows(lora_ops.bgmv_shrink):
        return
    users: tuple[ModuleType, ...] = (lora_ops, torch_ops, punica_cpu)
    for name in GATHERING_OPS:
        fixed = skip_base_rows(getattr(lora_ops, name))
        for module in users:
            if hasattr(module, name):
                setattr(module, name, fixed)
