"""Fine-tuning on Ray Train, supervised (SFT) or on preference pairs (DPO): a registry version
and chat data in, a registry version out, with the base as its lineage parent. LoRA publishes
an adapter of the base (what the serving app's multi-LoRA path serves); ``full`` publishes a
whole model.

The examples are rendered and packed here, once, and reach the workers through Ray's object
store; the workers read the base's weights from the registry themselves, so they may run on
any node.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rayllm.errors import RayllmError
from rayllm.eval.safety import training_conversations
from rayllm.finetune.config import FinetuneConfig
from rayllm.finetune.examples import (
    Conversation,
    Counts,
    PackedExamples,
    held_out_split,
    pack,
    pack_units,
    read_conversations,
    read_preferences,
    render,
    render_pair,
)
from rayllm.model.config import ModelConfig
from rayllm.model.hf import from_hf_config, save_hf_model, weights_dtype
from rayllm.paths import filesystem
from rayllm.progress import Stage, console
from rayllm.registry.importers import import_adapter
from rayllm.registry.store import Registry, Version, check_name, default_registry
from rayllm.train.checkpoint import consolidate, run_layout, trained_model
from rayllm.train.config import TrainConfig
from rayllm.train.lora import merged_state, save_adapter, trainable_parameters
from rayllm.train.mesh import mesh_shape
from rayllm.train.metrics import METRICS_LOG
from rayllm.train.prompt import save_virtual_token_adapter, virtual_tokens
from rayllm.train.trainer import fit, prepare_run_folder
from rayllm.version import code_version


@dataclass
class FinetuneResult:
    version: str
    """The published registry version, ``name:N``."""
    base: str
    metrics: dict[str, Any]
    """The trainer's last metrics, with ``base_val_loss``: the held-out response loss before."""
    counts: Counts
    trainable_parameters: int
    seconds: float


def run(config: FinetuneConfig) -> FinetuneResult:
    started = time.time()
    registry = Registry(config.registry or default_registry())
    base, folder = base_version(registry, config)
    name = check_name(config.name or f"{base.name}-{config.objective}", "finetune.name")
    shape = from_hf_config(json.loads((folder / "config.json").read_text()))
    if config.untie_embeddings:  # its head starts as a copy of the base's embedding
        shape = shape.model_copy(update={"tie_embeddings": False})
    if config.seq_len > shape.max_seq_len:
        raise RayllmError(
            f"finetune.seq_len {config.seq_len} is above {base.ref}'s context of "
            f"{shape.max_seq_len} tokens; lower it"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise RayllmError(f"{base.ref} has no chat template; publish its tokenizer with one")
    train = trainer_config(config, shape, registry.version_url(base))
    title = f"finetune: {config.objective} ({config.method}) of {base.ref} -> {name}"
    with Stage(title) as stage:
        virtual = virtual_tokens(shape.vocab_size, config.prompt) if train.prompt else []
        splits, counts = prepare_examples(config, tokenizer, virtual)
        what = "pairs" if config.objective == "dpo" else "examples"
        console.print(
            f"  {counts.examples:,} {what} ({counts.truncated} answers cut to fit {config.seq_len}"
            f" tokens, {counts.dropped} left with nothing to train on), "
            f"{len(splits['train'].inputs):,} + {len(splits['val'].inputs):,} packed rows; "
            f"{train.parallel.describe()} on {train.num_workers} workers"
        )
        check_batches(splits, train)
        manifest = {"seq_len": config.seq_len, "eos_token_id": tokenizer.eos_token_id}
        layout = run_layout(train, examples_sha256(splits), manifest)
        run_folder = f"{train.storage.rstrip('/')}/{train.run_name}"
        prepare_run_folder(run_folder, train, layout)
        refs = {split: ray.put(packed.arrays()) for split, packed in splits.items()}
        result = fit(train, manifest, layout, run_folder, refs)
        metrics = dict(result.metrics or {}) | starting_metrics(run_folder)
        with result.checkpoint.as_directory() as checkpoint:
            _, state, progress = consolidate(Path(checkpoint))
        model = trained_model(progress["layout"])
        model.load_state_dict(state)
        trainable = trainable_parameters(model)
        lineage = {
            "finetune": {
                "objective": config.objective,
                "method": config.method,
                "data": config.data,
                "examples": counts.__dict__,
                "settings": config.model_dump(mode="json", exclude={"registry"}),
                "trainable_parameters": trainable,
            },
            "metrics": metrics,
            "checkpoint": result.checkpoint.path,
            "code": code_version(),
        }
        with tempfile.TemporaryDirectory(prefix="rayllm-finetune-") as out:
            if config.method != "full":
                if train.lora:
                    save_adapter(model, train.lora, Path(out), base=base.ref)
                else:
                    save_virtual_token_adapter(model, train.prompt, Path(out), base=base.ref)
                version = import_adapter(registry, name, Path(out), base.ref, lineage)
            else:
                save_full_model(Path(out), shape, merged_state(model), tokenizer, folder)
                version = registry.publish(
                    name,
                    out,
                    {"parent": base.ref, "architecture": "LlamaForCausalLM"} | lineage,
                )
        stage.note(f"{improvement(metrics)}; published {version.ref}")
    return FinetuneResult(
        version=version.ref,
        base=base.ref,
        metrics=metrics,
        counts=counts,
        trainable_parameters=trainable,
        seconds=time.time() - started,
    )


def base_version(registry: Registry, config: FinetuneConfig) -> tuple[Version, Path]:
    """The base version, pinned, and a verified local copy (its config and tokenizer)."""
    return registry.local_path(config.base_version().ref)


def trainer_config(config: FinetuneConfig, shape: ModelConfig, base_url: str) -> TrainConfig:
    settings = config.train.model_dump(mode="json") | {
        "model": shape.model_dump(mode="json"),
        "init_from": base_url,
        "lora": config.lora.model_dump(mode="json") if config.method == "lora" else None,
        "prompt": (
            config.prompt.model_dump(mode="json") | {"kind": config.method}
            if config.method in ("prompt", "prefix")
            else None
        ),
        "objective": "dpo" if config.objective == "dpo" else "next_token",
        "dpo_beta": config.beta,
    }
    return TrainConfig.model_validate(settings).with_work_paths()


def prepare_examples(
    config: FinetuneConfig, tokenizer: PreTrainedTokenizerBase, virtual: list[int]
) -> tuple[dict[str, PackedExamples], Counts]:
    """The conversations (or preference pairs) rendered, each example after the ``virtual``
    tokens of prompt or prefix tuning (none otherwise), split (a seeded share held out) and
    packed."""
    counts = Counts()
    options = {"strict": config.strict, "counts": counts, "virtual": virtual}
    pad = tokenizer.eos_token_id
    if config.objective == "dpo":
        pairs = read_preferences(config.data, config.train.seed)
        held, kept = held_out_split(len(pairs), config.held_out, config.train.seed)
        kept = kept[: config.max_examples]
        return {
            split: pack_units(
                [render_pair(tokenizer, pairs[i]) for i in picked], config.seq_len, pad, **options
            )
            for split, picked in (("val", held), ("train", kept))
        }, counts
    conversations = read_conversations(config.data)
    held, kept = held_out_split(len(conversations), config.held_out, config.train.seed)
    splits = {"val": [conversations[i] for i in held]}
    splits["train"] = with_safety(
        [conversations[i] for i in kept[: config.max_examples]],
        config.safety_mixture,
        config.train.seed,
    )
    return {
        split: pack([render(tokenizer, c) for c in chosen], config.seq_len, pad, **options)
        for split, chosen in splits.items()
    }, counts


def with_safety(conversations: list[Conversation], share: float, seed: int) -> list[Conversation]:
    """The training conversations with rayllm's safety examples mixed in at ``share`` of the
    whole (repeated as needed), shuffled in at seeded places."""
    if not share:
        return conversations
    safety = training_conversations()
    wanted = round(share * len(conversations) / (1 - share))
    mixed = conversations + [safety[i % len(safety)] for i in range(wanted)]
    random.Random(seed).shuffle(mixed)
    return mixed


def check_batches(splits: dict[str, PackedExamples], train: TrainConfig) -> None:
    """Each split fills at least one global batch (refused here, before any worker starts)."""
    needed = mesh_shape(train).dp * train.micro_batch_size
    for split, packed in splits.items():
        if len(packed.inputs) < needed:
            setting = "held_out" if split == "val" else "max_examples, or add data"
            raise RayllmError(
                f"the {split} share packs into {len(packed.inputs)} rows, fewer than one global "
                f"batch of {needed}; raise {setting}, or lower train.micro_batch_size"
            )


def examples_sha256(splits: dict[str, PackedExamples]) -> str:
    digest = hashlib.sha256()
    for split in sorted(splits):
        for array in splits[split].arrays().values():
            digest.update(array.tobytes())
    return digest.hexdigest()


def starting_metrics(run_folder: str) -> dict[str, float]:
    """What the workers measured on the held-out share before the first step (the base's),
    each as ``base_<name>``."""
    fs, path = filesystem(f"{run_folder}/{METRICS_LOG}")
    for line in fs.cat_file(path).decode().splitlines():
        record = json.loads(line)
        if record["step"] == 0:
            return {f"base_{key}": value for key, value in record.items() if key != "step"}
    raise RayllmError(f"{run_folder} has no step-0 evaluation")


def improvement(metrics: dict[str, float]) -> str:
    text = f"held-out loss {metrics['base_val_loss']:.3f} -> {metrics['val_loss']:.3f}"
    if "preference_accuracy" in metrics:
        text += (
            f", prefers chosen {metrics['base_preference_accuracy']:.0%} -> "
            f"{metrics['preference_accuracy']:.0%}"
        )
    return text


def save_full_model(
    out: Path, shape: ModelConfig, state: dict, tokenizer: PreTrainedTokenizerBase, base: Path
) -> None:
    """The trained weights in the dtype of the base's (in the local folder ``base``)."""
    save_hf_model(
        out,
        shape,
        state,
        bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=weights_dtype(base),
    )
    tokenizer.save_pretrained(str(out))
