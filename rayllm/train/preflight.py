"""The training stage's settings checked against its data before anything starts: the CLI
runs these checks before it connects to Ray and hands their result to
:func:`rayllm.train.trainer.run`, which runs them itself for a library call or a job.
Configuration and file listings only: no torch, no Ray."""

from __future__ import annotations

import json
from typing import Any

from rayllm.data.shards import load_manifest
from rayllm.errors import RayllmError
from rayllm.paths import absolute_url, check_replaceable, filesystem
from rayllm.train.config import TrainConfig
from rayllm.train.mesh import MeshShape, mesh_shape

Checked = tuple[TrainConfig, dict[str, Any], MeshShape]
"""A config with absolute paths and its model's shape filled, its data's manifest, its mesh."""


def preflight(config: TrainConfig) -> Checked:
    """``config`` with absolute paths and its model's shape filled from the data, the data's
    manifest, and the mesh: or the first user error in them."""
    config = config.with_work_paths()
    config = config.model_copy(
        update={key: absolute_url(getattr(config, key)) for key in ("data", "output", "storage")}
    )
    shape = mesh_shape(config)
    manifest = load_manifest(config.data)
    check_replaceable(config.output, config.overwrite, "train.output", "output")
    if config.objective == "distill":
        config = with_teacher_vocabulary(config, manifest)
    config = resolve_model_shape(config, manifest)
    check_shards(config, manifest, data_parallel=shape.dp)
    return config, manifest, shape


def resolve_model_shape(config: TrainConfig, manifest: dict[str, Any]) -> TrainConfig:
    """Fill an automatic vocabulary size from the data; refuse shapes that do not fit it."""
    vocab = manifest["vocab_size"]
    model = config.model
    if model.vocab_size == 0:
        model = model.model_copy(update={"vocab_size": -(-vocab // 64) * 64})
    elif model.vocab_size < vocab:
        raise RayllmError(
            f"train.model.vocab_size is {model.vocab_size} but the tokenizer of {config.data} "
            f"has {vocab} tokens; set train.model.vocab_size to at least {vocab} (or 0 for auto)"
        )
    if manifest["seq_len"] > model.max_seq_len:
        raise RayllmError(
            f"the shards hold sequences of {manifest['seq_len']} tokens but "
            f"train.model.max_seq_len is {model.max_seq_len}; raise it or re-run data with a "
            "smaller data.seq_len"
        )
    return config.model_copy(update={"model": model})


def with_teacher_vocabulary(config: TrainConfig, manifest: dict[str, Any]) -> TrainConfig:
    """distill: the teacher must read the data's tokens (one tokenizer) and the model predict
    the teacher's vocabulary (``vocab_size`` 0 takes it)."""
    url = absolute_url(config.teacher)
    fs, path = filesystem(url)
    if not fs.exists(f"{path}/config.json") or not fs.exists(f"{path}/tokenizer.json"):
        raise RayllmError(
            f"train.teacher {config.teacher} is not a Hugging Face model folder with its "
            "tokenizer (config.json, tokenizer.json)"
        )
    from rayllm.data.tokenizer import tokenizer_vocabulary  # tokenizers: for distillation only

    data_tokenizer = f"{config.data.rstrip('/')}/{manifest['tokenizer']}"
    if tokenizer_vocabulary(url) != tokenizer_vocabulary(data_tokenizer):
        raise RayllmError(
            f"the teacher {config.teacher} and the data {config.data} have different "
            "tokenizers, so the teacher would read other text than the student; curate the "
            "data with the teacher's (rayllm data --set tokenizer.pretrained=TEACHER_FOLDER)"
        )
    vocab = json.loads(fs.cat_file(f"{path}/config.json"))["vocab_size"]
    model = config.model
    if model.vocab_size not in (0, vocab):
        raise RayllmError(
            f"train.model.vocab_size is {model.vocab_size} but the teacher predicts {vocab} "
            "tokens; set it to 0 (the teacher's) or to the teacher's"
        )
    model = model.model_copy(update={"vocab_size": vocab})
    return config.model_copy(update={"teacher": url, "model": model})


def check_shards(config: TrainConfig, manifest: dict[str, Any], data_parallel: int) -> None:
    """Every shard the manifest lists exists with its recorded size (workers check sha256),
    and each split read in global batches (over ``data_parallel`` ranks) holds one at least."""
    data = config.data.rstrip("/")
    global_batch = data_parallel * config.micro_batch_size
    fs, path = filesystem(data)
    for split in ("train", "val"):
        for entry in manifest["shards"][split]:
            where = f"{path}/{entry['path']}"
            if not fs.exists(where) or fs.size(where) != entry["bytes"]:
                raise RayllmError(
                    f"shard {data}/{entry['path']} is missing or has the wrong "
                    "size; re-run `rayllm data` to rebuild the shard set"
                )
        sequences = sum(entry["sequences"] for entry in manifest["shards"][split])
        streamed = split == "train" and config.data_loader == "ray_data"
        if sequences < global_batch and not streamed:
            raise RayllmError(
                f"{data} holds {sequences} {split} sequences, fewer than one global batch "
                f"({global_batch}: micro_batch_size {config.micro_batch_size} on each of "
                f"{data_parallel} data-parallel ranks); lower "
                "train.micro_batch_size or curate more data"
                + (" (or a larger data.val_fraction)" if split == "val" else "")
            )
