"""Every parallel layout trains the same model to the same numbers as DDP.

One worker group of 4 ranks runs them all in turn (DDP, ZeRO-1/2/3, ZeRO-3 with optimizer and
parameter offload, FSDP2, FSDP2 with CPU offload, HSDP, FSDP2 x TP with and without sequence
parallelism, DDP x PP with GPipe, FSDP2 x PP with 1F1B and with interleaved 1F1B; then LoRA
adapters under DDP, FSDP2 x TP with and without sequence parallelism and DDP x PP), and beside
it one of 8 ranks the 3-D layout PP x TP x FSDP2, 6 steps each on the same global batches in
fp32; then each layout's sharded checkpoint is consolidated and compared (LoRA's with DDP's
LoRA), and the memory each rank holds is checked.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rayllm.bench.layouts import LAYOUTS, layout_name, theory_mb
from rayllm.bench.train import compare_strategies
from rayllm.train.checkpoint import consolidate
from tests.conftest import overrides
from tests.test_cli import rayllm
from tests.test_readme import block_with, commands

pytestmark = pytest.mark.slow

WORKERS = 4
THREE_D = {"strategy": "fsdp", "pp": 2, "tp": 2}
"""Needs 2 x 2 x 2 ranks: its own worker group of 8."""
LORA = {
    "r": 4,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_LAYOUTS = [
    {"strategy": "ddp", "lora": LORA},
    {"strategy": "fsdp", "tp": 2, "lora": LORA},
    {"strategy": "fsdp", "tp": 2, "sequence_parallel": True, "lora": LORA},
    {"strategy": "ddp", "pp": 2, "pp_schedule": "gpipe", "lora": LORA},
]
"""Adapters on every projection, split column- and row-wise under tensor parallelism, and per
stage under pipeline parallelism: compared with DDP's adapters (the first)."""
MODEL = {"dim": 64, "n_layers": 4, "n_heads": 2, "n_kv_heads": 2, "ffn_dim": 128}
"""Tiny, with whole heads and KV heads for tensor parallel 2 and a layer per interleaved stage."""


@pytest.fixture(scope="module")
def compared(tiny_run, tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("layouts")
    common = {"global_batch": 8, "steps": 6, "model": MODEL}
    data = str(tiny_run["workdir"] / "data")
    layouts = [layout for layout in LAYOUTS if layout != THREE_D] + LORA_LAYOUTS
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two worker groups side by side
        four = pool.submit(
            compare_strategies,
            data,
            layouts,
            workers=WORKERS,
            cpus_per_worker=0.5,
            checkpoints=str(checkpoints / "4"),
            **common,
        )
        eight = pool.submit(
            compare_strategies,
            data,
            [THREE_D],
            workers=8,
            cpus_per_worker=0.25,
            checkpoints=str(checkpoints / "8"),
            **common,
        )
    results = four.result() | eight.result()
    folders = [checkpoints / "4" / str(index) for index in range(len(layouts))]
    return results, layouts + [THREE_D], folders + [checkpoints / "8" / "0"]


def reference(layout: dict) -> dict:
    """What a layout is compared with: DDP, or DDP with the same adapters."""
    return LORA_LAYOUTS[0] if layout.get("lora") else LAYOUTS[0]


def name(layout: dict) -> str:
    return layout_name(layout, 8 if layout == THREE_D else WORKERS)


def test_every_layout_follows_the_ddp_loss_curve(compared):
    results, layouts, _ = compared
    assert list(results) == [name(layout) for layout in layouts]
    ddp, adapters = (results[name(layout)]["losses"] for layout in (LAYOUTS[0], LORA_LAYOUTS[0]))
    assert ddp[-1] < ddp[0] - 0.1 and adapters[-1] < adapters[0]  # both learn
    for layout in layouts:
        expected = results[name(reference(layout))]["losses"]
        losses = results[name(layout)]["losses"]
        torch.testing.assert_close(losses, expected, rtol=0, atol=2e-4, msg=name(layout))


def test_every_layout_consolidates_to_the_ddp_weights(compared):
    _, layouts, folders = compared
    references = {
        index: consolidate(folders[index])[1]
        for index in {layouts.index(reference(layout)) for layout in layouts}
    }
    for layout, folder in zip(layouts, folders, strict=True):
        reference_weights = references[layouts.index(reference(layout))]
        _, weights, _ = consolidate(folder)
        assert weights.keys() == reference_weights.keys(), folder
        for key, expected in reference_weights.items():
            gap = (weights[key] - expected).abs()
            off = gap > 1e-4 + 1e-3 * expected.abs()
            # AdamW divides by a running gradient scale: an element whose gradient cancels over
            # the steps turns summation-order rounding into a visible gap. A few such elements
            # per tensor are allowed; a stale, shifted or mis-gathered shard moves far more.
            assert off.sum() <= max(1, off.numel() // 1000) and gap.max() < 1e-2, (
                f"{folder}: {key}: {int(off.sum())} of {off.numel()} elements differ "
                f"from DDP's, the most by {float(gap.max()):.2e}"
            )


def test_sharded_layouts_hold_their_share_of_the_state(compared):
    """Parameters + gradients + optimizer state per rank, measured on the tensors each engine
    holds: DDP holds all of it, ZeRO-3 and FSDP2 their 1/N share (the ZeRO paper's figures,
    DeepSpeed's fp32 master copy included), within 15%."""
    results, _, folders = compared
    _, weights, _ = consolidate(folders[0])
    params = sum(tensor.numel() for tensor in weights.values())
    for layout in (
        {"strategy": "ddp"},
        {"strategy": "zero", "zero_stage": 3},
        {"strategy": "fsdp"},
    ):
        held = max(results[layout_name(layout, WORKERS)]["held_mb"])
        assert held == pytest.approx(theory_mb(layout, params, WORKERS), rel=0.15), layout
    for stage in (1, 2):
        layout = {"strategy": "zero", "zero_stage": stage}
        held = max(results[layout_name(layout, WORKERS)]["held_mb"])
        assert held <= theory_mb(layout, params, WORKERS) * 1.15, layout


def test_the_readme_gpu_benchmark_is_refused_on_a_cluster_without_gpus(tiny_run, ray_cluster):
    """The README's one-GPU benchmark, as written but on this session's shard set: every flag
    and model setting is accepted, and a cluster without GPUs is named as the problem."""
    block = block_with("--gpu --workers 1").replace("\\\n", " ")
    (args,) = [command for command in commands(block) if command[:2] == ["bench", "train"]]
    args[args.index("--data") + 1] = str(tiny_run["workdir"] / "data")
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"]}
    done = rayllm(*args, env=env)
    assert done.returncode == 2, done.stderr
    assert "--gpu needs 1 GPUs (one per worker) but the Ray cluster has 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_global_batch_larger_than_a_split_is_refused_before_ray_is_reached(tiny_run, tmp_path):
    """Each split is read in global batches: one that holds fewer sequences than a global
    batch is named, with the sizes, before the command connects to Ray (``RAY_ADDRESS`` names
    no cluster here: reaching for it would be another error)."""
    data = tiny_run["workdir"] / "data"
    shards = json.loads((data / "manifest.json").read_text())["shards"]
    val = sum(entry["sequences"] for entry in shards["val"])
    batch = val // 2 + 1  # on 2 ranks: one more than the val split, far less than train
    settings = {"data": str(data), "storage": str(tmp_path / "runs"), "micro_batch_size": batch}
    done = rayllm(
        "train",
        *overrides(settings | {"output": str(tmp_path / "model"), "num_workers": 2}),
        env={"RAY_ADDRESS": "127.0.0.1:1"},
    )
    assert done.returncode == 2, done.stderr
    assert f"holds {val} val sequences, fewer than one global batch ({2 * batch}:" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()
