"""A model to score as a ``transformers`` model: a model folder, a registry version, or an
adapter version on its base (registry versions read from verified local copies)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

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


def agreement(expected: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """How closely the logits ``got`` follow ``expected`` (``[positions, vocabulary]``): the
    share of positions whose most likely next token agrees, and the largest difference."""
    return {
        "top1_agreement": (expected.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "max_logit_difference": (expected - got).abs().max().item(),
    }


def load_model(registry: str, model: str):
    """``(model, tokenizer)`` of ``model`` (a folder or a registry reference), fp32, in eval
    mode: a LoRA adapter merged into its base, a prompt- or prefix-tuning adapter read by its
    base as peft reads it."""
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
    if version.lineage["adapter"]["peft_type"] == "LORA":
        loaded = loaded.merge_and_unload()
    else:
        loaded = VirtualTokenModel(loaded)
    return loaded.eval(), AutoTokenizer.from_pretrained(base)


def adapter_model(store: Registry, version: Version, folder: Path):
    """``(PeftModel, base folder)``: the adapter ``version`` (read from ``folder``) on its
    base, fp32, not merged."""
    from peft import PeftModel

    _, base = store.local_path(version.lineage["parent"])
    return PeftModel.from_pretrained(load_causal_lm(base, torch.float32), folder), base


class VirtualTokenModel(torch.nn.Module):
    """A prompt- or prefix-tuning adapter on its base (a ``PeftModel``), scored like any causal
    LM: its logits are the real tokens' only (peft's prompt tuning also answers for the
    virtual tokens it puts first; a prefix is a cache and has none), and it generates as
    peft does. Such adapters do not merge: the base reads their virtual tokens."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        config = peft_model.peft_config["default"]
        self.virtual = config.num_virtual_tokens if config.peft_type == "PROMPT_TUNING" else 0

    def forward(self, input_ids: torch.Tensor, **kwargs):
        output = self.peft_model(input_ids=input_ids, **kwargs)
        output.logits = output.logits[:, self.virtual :]
        return output

    def generate(self, **kwargs) -> torch.Tensor:
        with warnings.catch_warnings():  # generate passes position ids, which peft ignores
            warnings.filterwarnings("ignore", "Position ids are not supported")
            return self.peft_model.generate(**kwargs)
