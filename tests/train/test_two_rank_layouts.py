"""Layouts over 2 ranks that must train as one rank does, step for step:

- fine-tuning's packed rows (several examples to a row, each attending only to itself, trained
  on its response tokens only) under every pipeline schedule, with and without LoRA: every
  stage is given the rows' segments, and each micro-batch's loss reads its own rows of the
  batch and counts for its share of the batch's trained targets;
- DPO (reference log-probabilities from the pipeline's last stage, a loss over whole pairs)
  and distillation (the teacher read on the last stage) under pipeline parallelism;
- a head tied to the embedding (SmolLM2's) under tensor parallelism, trained as one matrix or
  frozen under LoRA, and under pipeline parallelism, where the first stage holds the matrix as
  the embedding and the last as the head: trained as one (the two copies' gradients summed,
  counted once in the gradient norm) under GPipe and interleaved 1F1B, plain or as FSDP2's
  DTensors, or frozen under LoRA.

The 2 ranks are one process group spawned once (no Ray: what is checked is the engine)."""

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayllm.model.config import ModelConfig
from rayllm.model.hf import save_hf_model
from rayllm.model.model import IGNORED, Transformer
from rayllm.train.batches import ExampleBatches
from rayllm.train.checkpoint import consolidate, run_layout, write_progress
from rayllm.train.config import TrainConfig
from rayllm.train.engine import TorchEngine
from rayllm.train.loop import add_reference
from rayllm.train.mesh import mesh_shape
from tests.conftest import free_port

MODEL = {"vocab_size": 96, "dim": 64, "n_layers": 4, "n_heads": 2, "n_kv_heads": 2, "ffn_dim": 64}
ADAPTERS = {"none": None, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}}
STEPS, ROWS, SEQ = 3, 4, 24


class Layout(NamedTuple):
    parallel: dict
    adapters: str = "none"
    objective: str = "next_token"
    tied: bool = False

    def alone(self) -> "Layout":
        """The same run on one rank."""
        return self._replace(parallel={})


LAYOUTS = [
    *(
        Layout({"pp": 2, "pp_schedule": schedule}, adapters)
        for schedule in ("gpipe", "1f1b", "interleaved_1f1b")
        for adapters in ADAPTERS
    ),
    Layout({"pp": 2}, "lora", objective="dpo"),
    Layout({"pp": 2, "pp_schedule": "interleaved_1f1b"}, objective="distill"),
    TIED_TP := Layout({"tp": 2}, tied=True),
    Layout({"tp": 2, "sequence_parallel": True}, "lora", tied=True),
    TIED_PP := Layout({"pp": 2}, tied=True),
    Layout({"pp": 2, "pp_schedule": "interleaved_1f1b"}, tied=True),
    # FSDP2 wraps a data-parallel size of one when it offloads: the copies are DTensors.
    Layout({"pp": 2, "strategy": "fsdp", "fsdp_offload": True}, tied=True),
    Layout({"pp": 2}, "lora", tied=True),
]
CHECKPOINTED = [(TIED_TP, "tied-tp"), (TIED_PP, "tied-pp")]
"""Layouts whose last state is saved as a checkpoint (in that folder) and consolidated."""


def packed_rows(seed: int, pairs: bool) -> dict[str, np.ndarray]:
    """``ROWS x STEPS`` rows of ``SEQ`` tokens, each packing examples of random lengths whose
    first tokens (the prompt) are not trained on, so rows train on different numbers of
    targets. With ``pairs``, DPO's layout: a row holds 1 or 2 pairs (segments 2k + 1 chosen,
    2k + 2 rejected), then padding."""
    generator = torch.Generator().manual_seed(seed)
    rows = ROWS * STEPS
    tokens = torch.randint(0, MODEL["vocab_size"], (rows, SEQ + 1), generator=generator)
    segments = torch.zeros(rows, SEQ, dtype=torch.long)
    targets = tokens[:, 1:].clone()
    for row in range(rows):
        start, segment, last = 0, 1, 2 * (1 + row % 2) if pairs else SEQ
        while start < SEQ and segment <= last:
            length = int(torch.randint(3, 6 if pairs else 13, (), generator=generator))
            prompt = int(torch.randint(1, length, (), generator=generator))
            segments[row, start : start + length] = segment
            targets[row, start : start + prompt] = IGNORED
            start, segment = start + length, segment + 1
        targets[row, start:] = IGNORED  # padding
    return {
        "inputs": tokens[:, :-1].numpy(),
        "targets": targets.numpy(),
        "segments": segments.numpy(),
    }


def train(
    layout: Layout, folder: Path, checkpoint: Path | None = None
) -> tuple[list[float], TorchEngine]:
    """The first batch's loss, then per step the training loss, the gradient norm and the
    first batch's loss after it; and the engine (its state saved as a checkpoint in
    ``checkpoint``). Runs start from the weights in ``folder`` (a distillation's teacher: the
    other model there)."""
    parallel = layout.parallel
    config = TrainConfig.model_validate(
        {
            "num_workers": parallel.get("pp", 1) * parallel.get("tp", 1),
            "model": MODEL | {"tie_embeddings": layout.tied},
            "micro_batch_size": ROWS,
            "learning_rate": 0.01,
            "warmup_steps": 0,
            "steps": STEPS,
            "parallel": {"strategy": "ddp"} | parallel,
            "lora": ADAPTERS[layout.adapters],
            "objective": layout.objective,
            "init_from": str(folder / ("tied" if layout.tied else "untied")),
            "teacher": str(folder / "tied") if layout.objective == "distill" else None,
            "distill_alpha": 0.5,
        }
    )
    shape = mesh_shape(config)
    torch.manual_seed(0)  # LoRA's initial A
    engine = TorchEngine(config, shape, torch.device("cpu"))
    rows = ExampleBatches.for_rank(
        config, packed_rows(0, pairs=layout.objective == "dpo"), shape, dist.get_rank()
    )
    if layout.objective == "dpo":
        add_reference(engine, rows, torch.device("cpu"))
    batches = [rows.pick(np.arange(ROWS * step, ROWS * (step + 1))) for step in range(STEPS)]
    trace = [engine.evaluate(batches[0]).item()]
    for batch in batches:
        loss, norm = engine.train_step([batch])
        trace += [loss.item(), float(norm), engine.evaluate(batches[0]).item()]
    if checkpoint:
        engine.save(checkpoint)
        if dist.get_rank() == 0:
            write_progress(
                checkpoint, STEPS, run_layout(config, "", {"seq_len": SEQ, "eos_token_id": 0})
            )
    return trace, engine


def _two_ranks(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    folder = Path(folder)
    traces = [
        train(layout, folder, next((folder / f for x, f in CHECKPOINTED if x == layout), None))[0]
        for layout in LAYOUTS
    ]
    dist.destroy_process_group()
    if rank == 0:
        (folder / "traces.json").write_text(json.dumps(traces))


def test_objectives_and_tied_heads_train_over_two_ranks_as_on_one(tmp_path):
    torch.manual_seed(0)
    for tied in (False, True):
        shape = ModelConfig.model_validate(MODEL | {"tie_embeddings": tied})
        state = Transformer(shape).state_dict()
        save_hf_model(
            tmp_path / ("tied" if tied else "untied"), shape, state, bos_token_id=0, eos_token_id=0
        )
    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    traces = json.loads((tmp_path / "traces.json").read_text())

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        references = {str(layout.alone()): layout.alone() for layout in LAYOUTS}
        alone = {key: train(layout, tmp_path) for key, layout in references.items()}
    finally:
        dist.destroy_process_group()
    for trace, _ in alone.values():  # each moves its first batch's loss: not a no-op
        assert abs(trace[-1] - trace[0]) > 0.01, trace
    assert len(traces) == len(LAYOUTS)
    for layout, trace in zip(LAYOUTS, traces, strict=True):
        torch.testing.assert_close(
            torch.tensor(trace),
            torch.tensor(alone[str(layout.alone())][0]),
            rtol=1e-4,
            atol=0,
            msg=str(layout),
        )

    # The tied head trained under tensor or pipeline parallelism consolidates to one matrix
    # (the pipeline's two copies equal), the one rank's.
    for layout, folder in CHECKPOINTED:
        _, state, _ = consolidate(tmp_path / folder)
        assert torch.equal(state["lm_head.weight"], state["embed_tokens.weight"]), folder
        expected = alone[str(layout.alone())][1].parts[0].state_dict()
        assert state.keys() == expected.keys()
        for name, weight in expected.items():
            # Adam's steps (up to 0.01 each) turn last-digit differences of tiny gradients into
            # differences of up to about 1e-4, a hundredth of a step.
            torch.testing.assert_close(
                state[name],
                weight,
                rtol=1e-4,
                atol=1e-4,
                msg=lambda m, name=name, folder=folder: f"{folder}: {name}: {m}",
            )
