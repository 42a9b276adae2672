"""The ``transformers`` model of rayllm's compressed layouts that no Llama loader reads: linear
layers factorised into two low-rank ones, and decoder layers that share one set of weights.

This file is copied into every such model folder, whose ``config.json`` names it in
``auto_map``, so ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
loads the folder without rayllm installed. It imports only torch and transformers.

The layout is read from two keys of the Llama config:

- ``low_rank``: ``{"model.layers.0.mlp.up_proj": 96, ...}``: each named linear layer is
  ``up(down(x))``, ``down`` of ``rank`` outputs and ``up`` of the layer's own outputs;
- ``shared_layers``: ``[0, 0, 2, 2]``: decoder layer ``i`` uses the weights of layer
  ``shared_layers[i]``; only those layers' weights are stored, the others are tied to them when
  the model loads (each layer keeps its own index, and so its own KV cache).
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM


class LowRankLinear(torch.nn.Module):
    """``up(down(x))``: a linear layer of rank ``rank``, ``rank * (in + out)`` weights instead
    of ``in * out``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = torch.nn.Linear(in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class RayllmLlamaForCausalLM(LlamaForCausalLM):
    """A Llama whose config's ``low_rank`` layers are factorised and whose ``shared_layers``
    share weights."""

    def __init__(self, config):
        super().__init__(config)
        for name, rank in (getattr(config, "low_rank", None) or {}).items():
            holder_name, _, child = name.rpartition(".")
            holder = self.get_submodule(holder_name)
            dense = getattr(holder, child)
            factorised = LowRankLinear(
                dense.in_features, dense.out_features, rank, dense.bias is not None
            )
            setattr(holder, child, factorised.to(dense.weight.device, dense.weight.dtype))
        # post_init listed the tied parameters before the factorised layers replaced theirs
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """``transformers``' tied weights (the output head, where the config ties it) and the
        shared layers': ``{tied parameter: the parameter it is}``."""
        tied = super().get_expanded_tied_weights_keys(all_submodels)
        for index, source in enumerate(getattr(self.config, "shared_layers", None) or []):
            if source != index:
                for name, _ in self.model.layers[index].named_parameters():
                    tied[f"model.layers.{index}.{name}"] = f"model.layers.{source}.{name}"
        return tied
