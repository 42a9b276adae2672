"""rayllm's patch of vLLM's CPU LoRA ops (``rayllm.serve.cpu_lora_ops``): vLLM's plugin loader
finds it, and the patched ops give rows of slot -1 (base-model requests) no adapter while every
other row comes out as vLLM's own op makes it. The served half: ``tests/serve/test_lora.py``
batches a base-model request with two adapters' on the session's app."""

from importlib.metadata import entry_points

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

from rayllm.serve.cpu_lora_ops import GATHERING_OPS, install

SLOTS, IN, RANK, OUT = 3, 6, 4, 5


def op_cases(generator: torch.Generator) -> dict[str, tuple[tuple, dict, torch.Tensor]]:
    """Each gathering op's arguments for 5 rows over 3 slots: (inputs, weights, output, ...)."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "bgmv_shrink": ((rand(5, IN), rand(SLOTS, 1, RANK, IN)), {"scaling": 0.5}, rand(5, RANK)),
        "bgmv_expand": (
            (rand(5, RANK), rand(SLOTS, 1, OUT, RANK)),
            {"add_inputs": True},
            rand(5, OUT),
        ),
        "bgmv_expand_slice": (
            (rand(5, RANK), rand(SLOTS, 1, 2, RANK)),
            {"slice_offset": 1, "slice_size": 2, "add_inputs": True},
            rand(5, OUT),
        ),
    }


def run(op, case, slots: torch.Tensor) -> torch.Tensor:
    (inputs, weights), options, output = case
    output = output.clone()
    op(inputs, weights, output, slots, **options)
    return output


def test_vllm_loads_the_patch_as_a_general_plugin_in_every_engine_process():
    registered = {e.name: e.value for e in entry_points(group=DEFAULT_PLUGINS_GROUP)}
    assert registered["rayllm_cpu_lora_ops"] == "rayllm.serve.cpu_lora_ops:install"
    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["rayllm_cpu_lora_ops"] is install


@pytest.mark.parametrize("name", GATHERING_OPS)
def test_patched_ops_leave_base_rows_alone_and_the_others_bit_for_bit(name):
    install()
    install()  # vLLM may load its plugins twice in one process: one wrapper, not two
    patched = getattr(lora_ops, name)
    original = patched.__wrapped__
    assert getattr(punica_cpu, name) is patched and not hasattr(original, "__wrapped__")
    case = op_cases(torch.Generator().manual_seed(0))[name]
    before = case[2]

    mixed = torch.tensor([-1, 0, 2, -1, 1])
    base = mixed < 0
    theirs, ours = run(original, case, mixed), run(patched, case, mixed)
    assert not torch.equal(theirs[base], before[base])  # vLLM's fault: slot -1 is the last slot
    assert torch.equal(ours[base], before[base])
    assert torch.equal(ours[~base], theirs[~base])
    assert not torch.equal(ours[~base], before[~base])

    adapters_only = torch.tensor([2, 0, 1, 1, 0])
    assert torch.equal(run(patched, case, adapters_only), run(original, case, adapters_only))
    assert torch.equal(run(patched, case, torch.full((5,), -1)), before)
