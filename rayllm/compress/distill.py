"""Knowledge distillation as a compression method: the source version is the teacher, a
smaller student (its shape the teacher's but for what ``distill.student`` changes) is trained
by ``rayllm train`` on the shard set with the teacher's logits in its loss, and published with
the teacher as its parent, both models' held-out loss measured on the same rows."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from rayllm.compress.calibration import mean_loss, token_rows
from rayllm.compress.config import CompressConfig
from rayllm.compress.runner import publish_compressed
from rayllm.model.hf import from_hf_config
from rayllm.progress import Stage
from rayllm.train.config import TrainConfig
from rayllm.train.trainer import run as train


def distill_version(config: CompressConfig) -> dict:
    """Train the student (Ray Train's workers), measure it and the teacher here, publish."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    store = config.store()
    teacher, folder = store.local_path(config.source_version().ref)
    shape = from_hf_config(json.loads((folder / "config.json").read_text()))
    settings = config.distill
    student_shape = settings.student.of(shape)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held_out = token_rows(config.data, "val", config.eval_rows, tokenizer, "eval_rows")
    with tempfile.TemporaryDirectory(prefix="rayllm-distill-") as out:
        student = Path(out) / "student"
        trained = train(
            TrainConfig.model_validate(
                settings.train.model_dump(mode="json")
                | {
                    "model": student_shape.model_dump(mode="json"),
                    "objective": "distill",
                    "teacher": store.version_url(teacher),
                    "distill_alpha": settings.alpha,
                    "distill_temperature": settings.temperature,
                    "data": config.data,
                    "output": str(student),
                }
            )
        )
        tokenizer.save_pretrained(student)  # the teacher's own: one vocabulary, its template
        with Stage(f"compress: held-out loss of {teacher.ref} and its student") as stage:
            losses = [
                mean_loss(
                    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                    held_out,
                    config.batch_size,
                )
                for path in (folder, student)
            ]
            stage.note(f"loss {losses[0]['val_loss']:.4f} -> {losses[1]['val_loss']:.4f}")
        details = {
            "distillation": settings.model_dump(mode="json", exclude={"train"})
            | {
                "student": student_shape.model_dump(mode="json"),
                "parameters": student_shape.num_params(),
                "teacher_parameters": shape.num_params(),
                "steps": trained.metrics.get("step"),
                "train_seconds": round(trained.seconds, 1),
                "checkpoint": trained.checkpoint,
            }
        }
        return publish_compressed(
            config, teacher, folder, student, details, losses[0], losses[1], started
        )
