"""A model to score as a ``transformers`` model: a model folder, a registry version, or an
adapter version merged into its base (registry versions read from verified local copies)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rayllm.errors import RayllmError
from rayllm.registry.store import Registry, Version


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
    from transformers import AutoTokenizer

    if Path(model).is_dir():
        loaded = load_causal_lm(Path(model), torch.float32)
        return loaded.eval(), AutoTokenizer.from_pretrained(model)
    store = Registry(registry)
    version, folder = store.local_path(model)
    if "adapter" not in version.lineage:
        loaded = load_causal_lm(folder, torch.float32)
        return loaded.eval(), AutoTokenizer.from_pretrained(folder)
    loaded, base = adapter_model(store, version, folder)
    return loaded.merge_and_unload().eval(), AutoTokenizer.from_pretrained(base)


def adapter_model(store: Registry, version: Version, folder: Path):
    """``(PeftModel, base folder)``: the LoRA adapter ``version`` (read from ``folder``) on its
    base, fp32, not merged. Prompt and prefix adapters are refused: their virtual tokens are
    read by the model, not added to its weights, so they have no merged form."""
    from peft import PeftModel

    kind = version.lineage["adapter"].get("peft_type")
    if kind != "LORA":
        raise RayllmError(
            f"{version.ref} is a {kind} adapter, which does not merge into its base (its "
            "virtual tokens are read by the model, not added to its weights); only LoRA "
            f"adapters merge. Its held-out loss is in its lineage: rayllm registry show "
            f"{version.ref}"
        )
    _, base = store.local_path(version.lineage["parent"])
    loaded = PeftModel.from_pretrained(load_causal_lm(base, torch.float32), folder)
    return loaded, base
