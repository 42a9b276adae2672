"""Layouts over 2 ranks that must train as one rank does, step for step:

- fine-tuning's packed rows (several examples to a row, each attending only to itself, trained
  on its response tokens only) under every pipeline schedule, with and without LoRA: every
  stage is given the rows' segments, and each micro-batch's loss is its share of the whole
  batch's mean, however the trained targets fall over the micro-batches;
- a head tied to the embedding (SmolLM2's) under tensor parallelism, trained as one matrix or
  frozen under LoRA, and under pipeline parallelism with LoRA (each end stage holds the frozen
  matrix).

The 2 ranks are one process group spawned once (no Ray: what is checked is the engine)."""

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayllm.model.model import IGNORED
from rayllm.train.checkpoint import consolidate, run_layout, write_progress
from rayllm.train.config import TrainConfig
from rayllm.train.engine import TorchEngine
from rayllm.train.mesh import mesh_shape
from tests.conftest import free_port

MODEL = {"vocab_size": 96, "dim": 64, "n_layers": 4, "n_heads": 2, "n_kv_heads": 2, "ffn_dim": 64}
ADAPTERS = {"none": None, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}}
LAYOUTS = [  # (tied head, parallel settings, adapters)
    *(
        (False, {"pp": 2, "pp_schedule": schedule}, adapters)
        for schedule in ("gpipe", "1f1b", "interleaved_1f1b")
        for adapters in ADAPTERS
    ),
    TIED_TP := (True, {"tp": 2}, "none"),
    (True, {"tp": 2, "sequence_parallel": True}, "lora"),
    (True, {"pp": 2}, "lora"),
]
STEPS = 3


def packed_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 rows of 24 tokens, each packing examples of random lengths whose first tokens (the
    prompt) are not trained on: rows train on different numbers of targets."""
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, MODEL["vocab_size"], (4, 25), generator=generator)
    segments = torch.zeros(4, 24, dtype=torch.long)
    targets = tokens[:, 1:].clone()
    for row in range(4):
        start, segment = 0, 1
        while start < 24:
            length = int(torch.randint(3, 13, (), generator=generator))
            prompt = int(torch.randint(1, length, (), generator=generator))
            segments[row, start : start + length] = segment
            targets[row, start : start + prompt] = IGNORED
            start, segment = start + length, segment + 1
    return tokens[:, :-1], targets, segments


def train(
    tied: bool, parallel: dict, adapters: str, checkpoint: Path | None = None
) -> tuple[list[list[float]], TorchEngine]:
    """Per step: the training loss, the gradient norm, and the first batch's loss after it;
    and the engine (its state saved as a checkpoint in ``checkpoint``)."""
    config = TrainConfig.model_validate(
        {
            "num_workers": parallel.get("pp", 1) * parallel.get("tp", 1),
            "model": MODEL | {"tie_embeddings": tied},
            "micro_batch_size": 4,
            "learning_rate": 0.01,
            "warmup_steps": 0,
            "steps": STEPS,
            "parallel": {"strategy": "ddp"} | parallel,
            "lora": ADAPTERS[adapters],
        }
    )
    torch.manual_seed(0)
    engine = TorchEngine(config, mesh_shape(config), torch.device("cpu"))
    trace = []
    for step in range(STEPS):
        loss, norm = engine.train_step([packed_batch(step)])
        held_out = engine.evaluate(packed_batch(0))
        trace.append([loss.item(), float(norm), held_out.item()])
    if checkpoint:
        engine.save(checkpoint)
        if dist.get_rank() == 0:
            write_progress(
                checkpoint, STEPS, run_layout(config, "", {"seq_len": 24, "eos_token_id": 0})
            )
    return trace, engine


def _two_ranks(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    traces = [
        train(*layout, Path(out) / "tied-tp" if layout == TIED_TP else None)[0]
        for layout in LAYOUTS
    ]
    dist.destroy_process_group()
    if rank == 0:
        (Path(out) / "traces.json").write_text(json.dumps(traces))


def test_packed_rows_and_tied_heads_train_over_two_ranks_as_on_one(tmp_path):
    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    traces = json.loads((tmp_path / "traces.json").read_text())

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        alone = {
            (tied, adapters): train(tied, {}, adapters)
            for tied in (False, True)
            for adapters in ADAPTERS
        }
    finally:
        dist.destroy_process_group()
    for trace, _ in alone.values():  # each learns (its first batch's loss drops): not noise
        assert trace[-1][2] < trace[0][0]
    assert len(traces) == len(LAYOUTS)
    for (tied, parallel, adapters), trace in zip(LAYOUTS, traces, strict=True):
        torch.testing.assert_close(
            torch.tensor(trace),
            torch.tensor(alone[tied, adapters][0]),
            rtol=1e-4,
            atol=0,
            msg=f"tied={tied} {parallel} {adapters}",
        )

    # The tied head trained under tensor parallelism consolidates to one matrix, the one rank's.
    _, state, _ = consolidate(tmp_path / "tied-tp")
    assert torch.equal(state["lm_head.weight"], state["embed_tokens.weight"])
    expected = alone[True, "none"][1].parts[0].state_dict()
    assert state.keys() == expected.keys()
    for name, weight in expected.items():
        # Adam's steps (0.01 each) magnify last-digit differences of tiny gradients a little.
        torch.testing.assert_close(state[name], weight, rtol=1e-4, atol=5e-5, msg=name)
