"""Sharded checkpoints: what each holds, finding the latest one of a run, checking that a run
may resume from it, and consolidating any strategy's shards into one set of full weights.

Inside a Ray Train checkpoint every rank writes its own shards (``torch.distributed.checkpoint``
files for the torch strategies, DeepSpeed's for ZeRO) and rank 0 writes ``progress.json``:
the step reached and the run's layout, which is everything a resumed run must share with it
and everything consolidation needs to rebuild the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rayllm.errors import RayllmError
from rayllm.model.config import ModelConfig
from rayllm.model.model import Transformer
from rayllm.paths import filesystem
from rayllm.train.adapters import with_adapters
from rayllm.train.config import TrainConfig

PROGRESS = "progress.json"
RESUMABLE = (
    "model",
    "init_from",
    "lora",
    "prompt",
    "objective",
    "teacher",
    "parallel",
    "num_workers",
    "micro_batch_size",
    "grad_accum_steps",
    "steps",
)
"""Settings a resumed run must share with the run it continues."""
STOPPED = "stopped.json"
"""Written into the run folder when the loss became NaN or infinite: the run stops there, its
last checkpoint the last good one. (Ray Train hands the driver only the metrics that came with
a checkpoint, so the reason travels as a file.)"""


def run_layout(config: TrainConfig, data_sha256: str, manifest: dict[str, Any]) -> dict[str, Any]:
    settings = config.model_dump(mode="json")
    return {key: settings[key] for key in RESUMABLE} | {
        "data_sha256": data_sha256,
        "seq_len": manifest["seq_len"],
        "eos_token_id": manifest["eos_token_id"],
    }


def write_progress(folder: Path, step: int, layout: dict[str, Any]) -> None:
    (folder / PROGRESS).write_text(json.dumps({"step": step, "layout": layout}, indent=2))


def read_progress(folder: Path) -> dict[str, Any]:
    return json.loads((folder / PROGRESS).read_text())


def latest_checkpoint(run: str) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint of the Ray Train run folder ``run``, with its progress."""
    fs, path = filesystem(run)
    fs.invalidate_cache(path)  # object stores' listings are cached, and the run goes on
    if not fs.exists(path):
        return None
    found = []
    for folder in fs.ls(path, detail=False):
        if folder.rsplit("/", 1)[-1].startswith("checkpoint_") and fs.exists(
            f"{folder}/{PROGRESS}"
        ):
            try:
                found.append((json.loads(fs.cat_file(f"{folder}/{PROGRESS}")), folder))
            except json.JSONDecodeError:
                continue  # still being copied into storage: not complete yet
    if not found:
        return None
    progress, folder = max(found, key=lambda item: item[0]["step"])
    return f"{run.rstrip('/')}/{folder.rsplit('/', 1)[-1]}", progress


def check_resumable(run: str, layout: dict[str, Any]) -> int:
    """The step a resumed run starts from, or a clear error when it cannot resume."""
    latest = latest_checkpoint(run)
    if latest is None:
        raise RayllmError(
            f"train.resume is true but {run} holds no checkpoint to resume from; "
            "leave resume unset to start the run"
        )
    url, progress = latest
    stored = progress["layout"]
    changed = sorted(key for key in layout if stored.get(key) != layout[key])
    if changed:
        raise RayllmError(
            f"cannot resume {run}: its checkpoint {url} was written with different "
            f"{', '.join(changed)}; use the run's settings, or leave train.resume unset (or "
            "pick another train.run_name) to start a new run"
        )
    if progress["step"] >= layout["steps"]:
        raise RayllmError(f"{run} already finished all {layout['steps']} steps; nothing to resume")
    return progress["step"]


def consolidate(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The full fp32 weights of a checkpoint of any strategy, read in one process: the
    model's shape, its state dict (rayllm names) and the checkpoint's progress record."""
    progress = read_progress(folder)
    model_config = ModelConfig.model_validate(progress["layout"]["model"])
    if progress["layout"]["parallel"]["strategy"] == "zero":
        return model_config, _consolidate_zero(folder, progress), progress
    import torch.distributed.checkpoint as dcp  # ~1 s of imports a ZeRO checkpoint never needs

    state = {"model": trained_model(progress["layout"]).state_dict()}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return model_config, {k: v.float() for k, v in state["model"].items()}, progress


def trained_model(layout: dict[str, Any]) -> Transformer:
    """An empty model of the checkpoint's layout: its shape, with the LoRA adapters or virtual
    tokens it trained."""
    model = Transformer(ModelConfig.model_validate(layout["model"]))
    return with_adapters(model, layout.get("lora"), layout.get("prompt"))


def _consolidate_zero(folder: Path, progress: dict[str, Any]) -> dict[str, torch.Tensor]:
    from rayllm.train.deepspeed_engine import TAG

    if progress["layout"]["parallel"]["zero_stage"] == 0:
        states = torch.load(folder / TAG / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG))
