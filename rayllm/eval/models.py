"""A model to score as a ``transformers`` model: a model folder, a registry version, or an
adapter version merged into its base (registry versions read from verified local copies)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rayllm.errors import RayllmError
from rayllm.registry.store import Registry


def load_causal_lm(folder: Path, dtype: torch.dtype):
    """The ``transformers`` model in ``folder``; rayllm's compressed layouts (low-rank, shared
    layers) through rayllm's own model class, never the code the folder carries."""
    from transformers import AutoModelForCausalLM

    from rayllm.compress.modeling_rayllm import RayllmLlamaForCausalLM

    config = json.loads((Path(folder) / "config.json").read_text())
    if "RayllmLlamaForCausalLM" in (config.get("architectures") or []):
        return RayllmLlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def load_model(registry: str, model: str):
    """``(model, tokenizer)`` of ``model`` (a folder or a registry reference), fp32, in eval
    mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(model).is_dir():
        loaded = load_causal_lm(Path(model), torch.float32)
        return loaded.eval(), AutoTokenizer.from_pretrained(model)
    store = Registry(registry)
    version, folder = store.local_path(model)
    if "adapter" not in version.lineage:
        loaded = load_causal_lm(folder, torch.float32)
        return loaded.eval(), AutoTokenizer.from_pretrained(folder)
    kind = version.lineage["adapter"].get("peft_type")
    if kind != "LORA":
        raise RayllmError(
            f"{version.ref} is a {kind} adapter, which does not merge into its base; rayllm "
            "eval scores full models and LoRA adapters (its held-out loss is in its lineage: "
            f"rayllm registry show {version.ref})"
        )
    from peft import PeftModel

    _, base = store.local_path(version.lineage["parent"])
    loaded = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(loaded, folder).merge_and_unload()
    return loaded.eval(), AutoTokenizer.from_pretrained(base)
