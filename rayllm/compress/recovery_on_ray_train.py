"""The recovery fine-tune on Ray Train (``recovery.workers`` of 1 or more): the compress task
prunes and stages the pruned model beside the run's checkpoints, ``rayllm train``'s DDP
workers train it from there on the shard set, and the trained model is measured here and
published with the source as its parent, as the in-task recovery's would be."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray

from rayllm.cluster import task_result
from rayllm.compress.calibration import mean_loss, token_rows
from rayllm.compress.config import CompressConfig
from rayllm.compress.runner import compress_task
from rayllm.compress.task import publish_compressed
from rayllm.data.shards import load_manifest
from rayllm.data.tokenizer import tokenizer_vocabulary
from rayllm.errors import RayllmError
from rayllm.model.hf import from_hf_config, weights_dtype
from rayllm.paths import absolute_url, filesystem
from rayllm.progress import Stage
from rayllm.train.config import TrainConfig
from rayllm.train.trainer import run as run_training


def compress_then_train(config: CompressConfig) -> dict:
    """Prune in a Ray task, recover on Ray Train, measure and publish (a ``CompressResult``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    store = config.store()
    source, folder = store.local_path(config.source_version().ref)
    manifest = load_manifest(config.data)
    if tokenizer_vocabulary(str(folder)) != tokenizer_vocabulary(
        f"{config.data.rstrip('/')}/{manifest['tokenizer']}"
    ):
        raise RayllmError(
            f"recovery.workers: the trainer reads the shards' token ids as they are, but "
            f"{config.data} was cut with another tokenizer than {source.ref}'s; curate it with "
            "the source's (rayllm data --set tokenizer.pretrained=SOURCE_FOLDER), or set "
            "recovery.workers=0 (the compress task re-tokenizes)"
        )
    settings = trainer_settings(config, config.result_name(source))
    storage = TrainConfig.model_validate(settings).with_work_paths().storage
    start = f"{absolute_url(storage).rstrip('/')}/{settings['run_name']}-start"
    task = ray.remote(num_cpus=config.cpus)(compress_task)
    pruned = task_result(task.remote(config, start))
    fs, path = filesystem(start)
    shape = from_hf_config(json.loads(fs.cat_file(f"{path}/config.json")))
    train = TrainConfig.model_validate(
        settings | {"model": shape.model_dump(mode="json"), "init_from": start}
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held_out = token_rows(config.data, "val", config.eval_rows, tokenizer, "eval_rows")
    with tempfile.TemporaryDirectory(prefix="rayllm-recovery-") as out:
        recovered = Path(out) / "recovered"
        trained = run_training(train.model_copy(update={"output": str(recovered)}))
        dtype = weights_dtype(folder)
        model = AutoModelForCausalLM.from_pretrained(recovered, dtype=dtype)
        model.save_pretrained(recovered)
        tokenizer.save_pretrained(recovered)
        with Stage(f"compress: held-out loss of the recovered {config.method}") as stage:
            after = mean_loss(model.float().eval(), held_out, config.batch_size)
            stage.note(f"loss {after['val_loss']:.4f}")
        details = pruned["details"] | {
            "recovery": config.recovery.model_dump(mode="json")
            | {
                "pruned_val_loss": pruned["after"]["val_loss"],
                "train_loss": trained.metrics.get("loss"),
                "train_seconds": round(trained.seconds, 1),
                "checkpoint": trained.checkpoint,
            }
        }
        result = publish_compressed(
            config, source, folder, recovered, details, pruned["before"], after, started
        )
    fs.rm(path, recursive=True)  # the pruned start; the run's checkpoint stays
    return result


def trainer_settings(config: CompressConfig, result_name: str) -> dict:
    """The trainer's settings for the recovery: the in-task recovery's steps, rows, learning
    rate and schedule (a tenth of warm-up, a cosine down to a tenth), on DDP workers."""
    recovery = config.recovery
    return {
        "run_name": f"{result_name}-recovery",
        "storage": recovery.storage,
        "data": config.data,
        "num_workers": recovery.workers,
        "cpus_per_worker": recovery.cpus_per_worker,
        "micro_batch_size": recovery.rows_per_step // recovery.workers,
        "steps": recovery.steps,
        "warmup_steps": min(max(1, recovery.steps // 10), recovery.steps - 1),
        "learning_rate": recovery.learning_rate,
        "min_learning_rate": recovery.learning_rate / 10,
        "weight_decay": 0.0,
        "eval_every": recovery.steps,
        "eval_batches": 1,
        "checkpoint_every": recovery.steps,
        "overwrite": True,  # a by-product of this compress run, named after its result
    }
