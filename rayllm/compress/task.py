"""The Ray task of ``rayllm compress``: read the source from the registry, measure its
held-out loss, compress, measure again, and publish the result with the source as its parent,
its method and settings, its size on disk and its losses before and after."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from rayllm.compress import modeling_rayllm
from rayllm.compress.calibration import mean_loss, token_rows
from rayllm.compress.config import RAYLLM_LAYOUTS, CompressConfig
from rayllm.compress.lowrank import factorise_model
from rayllm.compress.prune import prune_model
from rayllm.compress.quantize import compressed_state, quantize_model
from rayllm.compress.recovery import recover
from rayllm.compress.runner import CompressResult
from rayllm.compress.sharing import share_layers
from rayllm.eval.models import load_causal_lm
from rayllm.model.hf import weights_dtype
from rayllm.paths import put_folder
from rayllm.progress import Stage
from rayllm.registry.store import Version
from rayllm.version import code_version


def compress_version(config: CompressConfig, stage_to: str | None = None) -> dict:
    """The Ray task: read the source, measure, compress, measure again, write and publish; with
    ``stage_to``, write the result there instead (for the recovery on Ray Train) and return
    its details and the losses before and after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, int(config.cpus)))
    started = time.time()
    store = config.store()
    source, folder = store.local_path(config.source_version().ref)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    saved_dtype = weights_dtype(folder)
    held_out = token_rows(config.data, "val", config.eval_rows, tokenizer, "eval_rows")
    calibration = None
    if config.needs_calibration():
        calibration = token_rows(
            config.data, "train", config.calibration_rows, tokenizer, "calibration_rows"
        )
    training = None
    if config.recovery.steps and not config.recovery.on_ray_train():
        recovery = config.recovery
        training = token_rows(
            config.data,
            "train",
            recovery.steps * recovery.rows_per_step,
            tokenizer,
            "recovery.rows_per_step",
            required=recovery.rows_per_step,
        )
    with Stage(f"compress: held-out loss of {source.ref}") as stage:
        before = mean_loss(model, held_out, config.batch_size)
        stage.note(f"loss {before['val_loss']:.4f}")
    with (
        Stage(f"compress: {config.method} {source.ref}") as stage,
        tempfile.TemporaryDirectory(prefix="rayllm-compress-") as out,
    ):
        tensors, details = compressed(model, config, calibration, saved_dtype, training)
        if config.method in RAYLLM_LAYOUTS:
            write_rayllm_layout(model.config, Path(out))
        save_file(tensors, f"{out}/model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if config.method in RAYLLM_LAYOUTS:  # measured as published: the folder read back
            model = load_causal_lm(Path(out), torch.float32)
        after = mean_loss(model, held_out, config.batch_size)
        stage.note(f"loss {after['val_loss']:.4f}")
        if calibration is not None:
            details["calibration_rows"] = len(calibration)
        if stage_to:
            put_folder(out, stage_to)
            return {"details": details, "before": before, "after": after}
        return publish_compressed(
            config, source, folder, Path(out), details, before, after, started
        )


def publish_compressed(
    config: CompressConfig,
    source: Version,
    folder: Path,
    out: Path,
    details: dict,
    before: dict[str, float],
    after: dict[str, float],
    started: float,
) -> dict:
    """Publish the compressed model in ``out`` with its lineage: the source (whose local copy
    is ``folder``) as its parent, the method's ``details``, the weights' size and the held-out
    loss before and after; a ``CompressResult`` as a dict."""
    size_before, size_after = weight_bytes(folder), weight_bytes(out)
    lineage = {
        "parent": source.ref,
        "architecture": source.lineage.get("architecture", "LlamaForCausalLM"),
        "compression": {
            "method": config.method,
            "calibration_rows": 0,
            **details,
            "data": config.data,
            "bytes_before": size_before,
            "bytes_after": size_after,
            "seconds": round(time.time() - started, 1),
        },
        "metrics": {
            "base_val_loss": before["val_loss"],
            "val_loss": after["val_loss"],
            "perplexity": after["perplexity"],
            "eval_tokens": after["tokens"],
        },
        "code": code_version(),
    }
    version = config.store().publish(config.result_name(source), str(out), lineage)
    return asdict(
        CompressResult(
            version=version.ref,
            bytes_before=size_before,
            bytes_after=size_after,
            loss_before=before["val_loss"],
            loss_after=after["val_loss"],
            seconds=round(time.time() - started, 1),
        )
    )


def compressed(
    model: torch.nn.Module,
    config: CompressConfig,
    calibration: torch.Tensor | None,
    dtype: torch.dtype,
    training: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Apply the method to ``model`` in place, then the recovery fine-tune on the ``training``
    rows if given; returns the tensors to save (in ``dtype``, quantized ones as
    compressed-tensors stores them) and what the lineage records of it."""
    if config.method == "quantize":
        scales = quantize_model(model, config.quantize, calibration, config.batch_size, dtype)
        tensors, quantization = compressed_state(saved_state(model), scales, config.quantize, dtype)
        model.config.quantization_config = quantization
        return tensors, {"quantization": config.quantize.model_dump(mode="json")}
    if config.method == "low_rank":
        details = factorise_model(model, config.low_rank, calibration, config.batch_size)
    elif config.method == "share":
        details = share_layers(model, config.share)
    else:
        details = {"pruning": config.prune.model_dump(mode="json")}
        details |= prune_model(model, config.prune, calibration, config.batch_size)
    if training is not None:
        details |= recover(model, training, config.recovery)
    return {k: v.to(dtype) for k, v in saved_state(model).items()}, details


def saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as ``save_pretrained`` writes them: contiguous, a tied output head
    and shared layers' copies left out."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for index, source in enumerate(getattr(model.config, "shared_layers", None) or []):
        if source != index:  # a layer whose weights are another's is stored once
            state = {k: v for k, v in state.items() if not k.startswith(f"model.layers.{index}.")}
    return state


def write_rayllm_layout(config, out: Path) -> None:
    """Make ``out`` a ``modeling_rayllm`` model folder: the model file beside the weights,
    named in ``config`` (saved after this) for ``AutoModelForCausalLM`` with
    ``trust_remote_code``."""
    shutil.copy(modeling_rayllm.__file__, out / "modeling_rayllm.py")
    config.architectures = ["RayllmLlamaForCausalLM"]
    config.auto_map = {"AutoModelForCausalLM": "modeling_rayllm.RayllmLlamaForCausalLM"}


def weight_bytes(folder: Path) -> int:
    """Bytes of a model folder's weight files."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
