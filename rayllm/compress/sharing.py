"""Weight sharing across the decoder layers of a ``transformers`` Llama, in place (as ALBERT
shares its layers): each run of consecutive layers computes with one set of weights, the run's
mean or its first layer's, stored once. Every layer keeps its own index and KV cache. The result
is a ``modeling_rayllm`` model: ``transformers`` loads it, vLLM does not."""

from __future__ import annotations

import torch

from rayllm.compress.config import ShareSettings
from rayllm.errors import RayllmError


@torch.no_grad()
def share_layers(model: torch.nn.Module, settings: ShareSettings) -> dict:
    """Tie ``model``'s layers in runs of ``settings.group``; returns what the lineage records."""
    layers = model.model.layers
    if settings.group > len(layers):
        raise RayllmError(
            f"share.group {settings.group} is more than the model's {len(layers)} layers; set "
            f"at most {len(layers)} (every layer one set of weights, as in ALBERT)"
        )
    sources = [index - index % settings.group for index in range(len(layers))]
    for start in sorted(set(sources)):
        run = layers[start : start + settings.group]
        first = run[0]
        for path, parameter in list(first.named_parameters()):
            if settings.merge == "mean":
                parameter.copy_(torch.stack([m.get_parameter(path) for m in run]).mean(0))
            holder, _, name = path.rpartition(".")
            for member in run[1:]:
                setattr(member.get_submodule(holder), name, parameter)
    model.config.shared_layers = sources
    return {
        "share": settings.model_dump(mode="json"),
        "stored_layers": len(set(sources)),
        "layers": len(layers),
    }
