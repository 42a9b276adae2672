"""A LoRA adapter version merged into its base and published as a full version: what a
server without multi-LoRA, an export to GGUF, or a further full fine-tune needs. The merge is
peft's (``merge_and_unload``); what is rayllm's is writing it in the base's dtype with the
base's tokenizer, checking that the written model computes what the adapter on its base
does, and only then publishing it, with the adapter as its parent."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from rayllm.errors import RayllmError
from rayllm.registry.store import Registry, Version, check_name

PROBE = "The registry holds every version, and each version knows where it came from."
"""Text the merged model must score as the adapter on its base does."""

AGREEMENT = 0.9
"""The least share of the probe's next tokens the merged model must predict as the adapter
does (a bfloat16 base rounds the merged weights; a wrong merge agrees on few)."""


def publish_merged(registry: Registry, ref: str, name: str) -> tuple[Version, dict[str, Any]]:
    """Publish the LoRA adapter ``ref`` merged into its base as the next version of ``name``.
    Returns the version and the check: the share of the probe's next tokens that agree, and
    the largest logit difference."""
    from transformers import AutoTokenizer

    from rayllm.eval.models import adapter_model, agreement, load_causal_lm
    from rayllm.model.hf import weights_dtype

    check_name(name)
    adapter, folder = registry.local_path(ref)
    if "adapter" not in adapter.lineage:
        raise RayllmError(
            f"{adapter.ref} is a full model, not an adapter; rayllm registry merge takes a LoRA "
            "adapter version (its base is the adapter's parent)"
        )
    kind = adapter.lineage["adapter"].get("peft_type")
    if kind != "LORA":
        raise RayllmError(
            f"{adapter.ref} is a {kind} adapter, which does not merge into its base (its "
            "virtual tokens are read by the model, not added to its weights); only LoRA "
            "adapters merge. rayllm eval scores it as it is (peft reads it on its base)"
        )
    model, base = adapter_model(registry, adapter, folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = torch.tensor([tokenizer(PROBE)["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits[0]
    dtype = weights_dtype(base)
    with tempfile.TemporaryDirectory(prefix="rayllm-merge-") as out:
        model.merge_and_unload().to(dtype).save_pretrained(out)
        tokenizer.save_pretrained(out)
        with torch.no_grad():
            got = load_causal_lm(Path(out), torch.float32).eval()(ids).logits[0]
        check = agreement(expected, got) | {"dtype": str(dtype).removeprefix("torch.")}
        if check["top1_agreement"] < AGREEMENT:
            raise RayllmError(
                f"{adapter.ref} merged into {adapter.lineage['parent']} does not compute what "
                f"the adapter does (next-token agreement {check['top1_agreement']:.0%}); "
                "nothing was published"
            )
        lineage = {
            "parent": adapter.ref,
            "source": {
                "kind": "merged-adapter",
                "base": adapter.lineage["parent"],
                "adapter": adapter.lineage["adapter"],
            },
            "architecture": adapter.lineage.get("architecture"),
        }
        return registry.publish(name, out, lineage), check
