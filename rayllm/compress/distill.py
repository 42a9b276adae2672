"""Knowledge distillation as a compression method: the source version is the teacher, a
smaller student (its shape the teacher's but for what ``distill.student`` changes, its start
evenly spaced layers of the teacher or a random init) is trained by ``rayllm train`` on the
shard set with the teacher's logits in its loss, saved in the teacher's dtype and published
with the teacher as its parent, both models' held-out loss measured on the same rows."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from rayllm.compress.calibration import mean_loss, token_rows
from rayllm.compress.config import CompressConfig
from rayllm.compress.task import publish_compressed
from rayllm.errors import RayllmError
from rayllm.model.config import ModelConfig
from rayllm.model.hf import from_hf_config, read_hf_model, save_hf_model, weights_dtype
from rayllm.paths import absolute_url, put_folder
from rayllm.progress import Stage
from rayllm.train.config import TrainConfig
from rayllm.train.trainer import run as run_training


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
    train = TrainConfig.model_validate(
        settings.train.model_dump(mode="json")
        | {
            "model": student_shape.model_dump(mode="json"),
            "objective": "distill",
            "teacher": store.version_url(teacher),
            "distill_alpha": settings.alpha,
            "distill_temperature": settings.temperature,
            "data": config.data,
        }
    ).with_work_paths()
    if settings.init == "teacher_layers":
        init = f"{absolute_url(train.storage).rstrip('/')}/{train.run_name}-init"
        special = (tokenizer.bos_token_id or tokenizer.eos_token_id, tokenizer.eos_token_id)
        write_starting_student(folder, shape, student_shape, special, init)
        train = train.model_copy(update={"init_from": init})
    with tempfile.TemporaryDirectory(prefix="rayllm-distill-") as out:
        student = Path(out) / "student"
        trained = run_training(train.model_copy(update={"output": str(student)}))
        dtype = weights_dtype(folder)
        AutoModelForCausalLM.from_pretrained(student, dtype=dtype).save_pretrained(student)
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


def teacher_layers(teacher: int, student: int) -> list[int]:
    """The teacher's layers a student of ``student`` layers starts from: evenly spaced, the
    first and the last among them."""
    if student == 1:
        return [teacher - 1]
    return [round(index * (teacher - 1) / (student - 1)) for index in range(student)]


def starting_student(
    state: dict[str, torch.Tensor], teacher: ModelConfig, student: ModelConfig
) -> dict[str, torch.Tensor]:
    """The student's starting weights (rayllm names) from the teacher's ``state``."""
    widths = ("dim", "n_heads", "n_kv_heads", "head_size", "ffn_dim")
    changed = [key for key in widths if getattr(student, key) != getattr(teacher, key)]
    if changed or student.n_layers > teacher.n_layers:
        what = f"changes {', '.join(changed)}" if changed else f"has {student.n_layers} layers"
        raise RayllmError(
            f"distill.init teacher_layers starts the student from the teacher's layers, but the "
            f"student {what} (the teacher: {teacher.n_layers} layers of dim {teacher.dim}); keep "
            "the teacher's widths and at most its layers, or set distill.init=random"
        )
    start = {name: tensor for name, tensor in state.items() if not name.startswith("layers.")}
    for index, picked in enumerate(teacher_layers(teacher.n_layers, student.n_layers)):
        prefix = f"layers.{picked}."
        start |= {
            f"layers.{index}.{name.removeprefix(prefix)}": tensor
            for name, tensor in state.items()
            if name.startswith(prefix)
        }
    return start


def write_starting_student(
    folder: Path, teacher: ModelConfig, student: ModelConfig, special: tuple[int, int], url: str
) -> None:
    """The student's starting weights as a Hugging Face folder at ``url`` (beside the run's
    checkpoints, so workers on every node read it) for the trainer's ``init_from``."""
    _, state = read_hf_model(str(folder))
    start = starting_student(state, teacher, student)
    with tempfile.TemporaryDirectory(prefix="rayllm-distill-init-") as local:
        save_hf_model(
            local,
            student,
            start,
            bos_token_id=special[0],
            eos_token_id=special[1],
        )
        put_folder(local, url)
