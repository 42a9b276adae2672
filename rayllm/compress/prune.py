"""Pruning of a ``transformers`` Llama-architecture model, in place.

Unstructured pruning zeroes each linear layer's smallest weights (the files keep their size; the
sparsity is recorded). Structured pruning removes whole key-value head groups, MLP channels or
decoder layers, the same number in every layer, so the result is a smaller model of the same
architecture that any Llama loader (vLLM included) runs. What goes is chosen by its importance
on the calibration rows:

- a head group: the energy its heads feed into ``o_proj`` (mean squared input times the squared
  norm of the weights that read it);
- an MLP channel: the same through ``down_proj``;
- a layer: how much it changes the hidden state, ``1 - cos(input, output)`` (ShortGPT's block
  influence).
"""

from __future__ import annotations

import torch

from rayllm.compress.calibration import calibration_pass
from rayllm.compress.config import PruneSettings
from rayllm.errors import RayllmError
from rayllm.model.hf import head_width


def prune_model(
    model: torch.nn.Module, settings: PruneSettings, calibration: torch.Tensor, batch_size: int
) -> dict:
    """Prune ``model`` by ``settings``; returns what was removed, for the lineage."""
    if settings.structure == "unstructured":
        return prune_unstructured(model, settings.sparsity)
    layers = model.model.layers
    if settings.structure == "layers":
        influence = block_influence(model, calibration, batch_size)
        removed = _lowest(influence, settings.sparsity, "layers")
        keep = [i for i in range(len(layers)) if i not in removed]
        model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = index
        model.config.num_hidden_layers = len(keep)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in keep]
        return {"removed_layers": sorted(removed)}
    energies = input_energy(
        model, calibration, batch_size, "o_proj" if settings.structure == "heads" else "down_proj"
    )
    if settings.structure == "heads":
        return _prune_heads(model, energies, settings.sparsity)
    return _prune_channels(model, energies, settings.sparsity)


def prune_unstructured(model: torch.nn.Module, sparsity: float) -> dict:
    """Zero the ``sparsity`` share of smallest-magnitude weights of every decoder linear layer."""
    zeroed = total = 0
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight.data
                count = int(weight.numel() * sparsity)
                if count:
                    threshold = weight.abs().flatten().kthvalue(count).values
                    weight[weight.abs() <= threshold] = 0
                zeroed += int((weight == 0).sum())
                total += weight.numel()
    return {"sparsity": round(zeroed / total, 4)}


def _lowest(scores: torch.Tensor, share: float, what: str) -> set[int]:
    """Indices of the ``share`` lowest scores (a share below 1 keeps at least one)."""
    count = int(len(scores) * share)
    if count == 0:
        raise RayllmError(
            f"prune.sparsity {share} removes 0 of {len(scores)} {what}: choose a share of at "
            f"least {1 / len(scores):.3g}, or another structure"
        )
    return set(torch.argsort(scores)[:count].tolist())


@torch.no_grad()
def input_energy(
    model: torch.nn.Module, rows: torch.Tensor, batch_size: int, projection: str
) -> list[torch.Tensor]:
    """Per layer, the importance of each input channel of ``projection``: mean squared input
    over the calibration rows times the squared norm of the weight column reading it."""
    modules = [
        getattr(layer.self_attn if projection == "o_proj" else layer.mlp, projection)
        for layer in model.model.layers
    ]
    sums = [torch.zeros(m.in_features) for m in modules]
    count = [0]

    def record(index):
        def hook(_, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[index] += x.pow(2).sum(0)
            if index == 0:
                count[0] += len(x)

        return hook

    handles = [m.register_forward_pre_hook(record(i)) for i, m in enumerate(modules)]
    calibration_pass(model, rows, batch_size, handles)
    return [
        s / count[0] * m.weight.float().pow(2).sum(0) for s, m in zip(sums, modules, strict=True)
    ]


@torch.no_grad()
def block_influence(model: torch.nn.Module, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per layer, the mean of ``1 - cos(input, output)`` over the calibration tokens."""
    layers = model.model.layers
    totals = torch.zeros(len(layers))
    count = [0]

    def record(index):
        def hook(_, args, kwargs, output):
            before = (args[0] if args else kwargs["hidden_states"]).float()
            after = (output[0] if isinstance(output, tuple) else output).float()
            totals[index] += (1 - torch.cosine_similarity(before, after, dim=-1)).sum()
            if index == 0:
                count[0] += before.shape[0] * before.shape[1]

        return hook

    handles = [
        layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    calibration_pass(model, rows, batch_size, handles)
    return totals / count[0]


def _keep_rows(linear: torch.nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[keep].clone())
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[keep].clone())
    linear.out_features = len(keep)


def _keep_columns(linear: torch.nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[:, keep].clone())
    linear.in_features = len(keep)


def _prune_heads(model: torch.nn.Module, energies: list[torch.Tensor], sparsity: float) -> dict:
    """Remove the same number of key-value head groups (a KV head and the query heads that
    share it) from every layer."""
    config = model.config
    head_dim = head_width(config.to_dict())
    groups = config.num_key_value_heads
    per_group = config.num_attention_heads // groups
    removed = {}
    for index, (layer, energy) in enumerate(zip(model.model.layers, energies, strict=True)):
        scores = energy.reshape(groups, per_group * head_dim).sum(1)
        gone = _lowest(scores, sparsity, "key-value head groups")
        kept = torch.tensor([g for g in range(groups) if g not in gone])
        kv_rows = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
        q_heads = (kept[:, None] * per_group + torch.arange(per_group)).flatten()
        q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        attention = layer.self_attn
        _keep_rows(attention.q_proj, q_rows)
        _keep_rows(attention.k_proj, kv_rows)
        _keep_rows(attention.v_proj, kv_rows)
        _keep_columns(attention.o_proj, q_rows)
        removed[index] = sorted(gone)
        for holder in (attention, getattr(attention, "config", None)):
            if holder is not None and hasattr(holder, "num_key_value_groups"):
                holder.num_key_value_groups = per_group
    config.head_dim = head_dim
    config.num_key_value_heads = groups - len(next(iter(removed.values())))
    config.num_attention_heads = config.num_key_value_heads * per_group
    return {"removed_kv_heads": removed}


def _prune_channels(model: torch.nn.Module, energies: list[torch.Tensor], sparsity: float) -> dict:
    """Remove the same number of MLP channels (rows of gate and up, columns of down) from
    every layer."""
    kept_count = 0
    for layer, energy in zip(model.model.layers, energies, strict=True):
        gone = _lowest(energy, sparsity, "MLP channels")
        kept = torch.tensor(sorted(set(range(len(energy))) - gone))
        _keep_rows(layer.mlp.gate_proj, kept)
        _keep_rows(layer.mlp.up_proj, kept)
        _keep_columns(layer.mlp.down_proj, kept)
        kept_count = len(kept)
    model.config.intermediate_size = kept_count
    return {"intermediate_size": kept_count}
