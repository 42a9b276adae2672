"""Low-rank factorisation of a ``transformers`` Llama's linear layers, in place.

A weight ``W`` (out x in) becomes ``up @ down`` from a truncated SVD. Plain: the SVD of ``W``
itself, ``U S V^T``, gives ``down = sqrt(S_r) V_r^T`` and ``up = U_r sqrt(S_r)``, the best rank-r
approximation of the weights (Eckart-Young). Calibrated (SVD-LLM, Wang et al., 2024): the SVD
of ``W L``, ``L`` the Cholesky factor of the layer's calibration inputs' ``X^T X``, with ``L^-1``
folded into ``down``: the best rank-r approximation of the layer's outputs on that data, which
is what the model computes with.

A factorisation saves weights only below the break-even rank ``in * out / (in + out)``; a layer
whose kept rank is not below it stays dense and is counted. The result is a ``modeling_rayllm``
model: ``transformers`` loads it, vLLM does not.
"""

from __future__ import annotations

import torch

from rayllm.compress.config import LowRankSettings
from rayllm.compress.modeling_rayllm import LowRankLinear
from rayllm.compress.quantize import input_hessians
from rayllm.errors import RayllmError

DAMPENING = 0.01
"""Added to ``X^T X``'s diagonal, as a share of its mean, so its Cholesky factor exists."""


def factorise_model(
    model: torch.nn.Module,
    settings: LowRankSettings,
    calibration: torch.Tensor | None = None,
    batch_size: int = 8,
) -> dict:
    """Factorise ``model``'s targeted decoder layers (calibrated when ``calibration`` rows are
    given); returns what the lineage records."""
    layers = dict(targeted_layers(model, settings.targets))
    hessians = {}
    if calibration is not None:
        hessians = input_hessians(model, layers, calibration, batch_size)
    ranks: dict[str, int] = {}
    dense: list[tuple[str, int]] = []  # (layer, its kept rank) for the layers left dense
    for name, linear in layers.items():
        weight = linear.weight.data.float()
        whitening = cholesky(hessians[name]) if hessians else None
        u, s, vh = torch.linalg.svd(
            weight if whitening is None else weight @ whitening, full_matrices=False
        )
        rank = settings.rank or energy_rank(s, settings.energy)
        if rank >= break_even(linear):
            dense.append((name, rank))
            continue
        root = s[:rank].sqrt()
        down = root[:, None] * vh[:rank]
        if whitening is not None:  # down @ L^-1, as (L^-T down^T)^T
            down = torch.linalg.solve_triangular(whitening.T, down.T, upper=True).T
        factorised = LowRankLinear(
            linear.in_features, linear.out_features, rank, linear.bias is not None
        )
        factorised.down.weight.data = down.to(linear.weight.dtype)
        factorised.up.weight.data = (u[:, :rank] * root).to(linear.weight.dtype)
        if linear.bias is not None:
            factorised.up.bias.data = linear.bias.data.clone()
        holder, _, child = name.rpartition(".")
        setattr(model.get_submodule(holder), child, factorised)
        ranks[name] = rank
    if not ranks:
        raise RayllmError(nothing_shrinks(model, settings, dense))
    model.config.low_rank = ranks
    return {
        "low_rank": settings.model_dump(mode="json"),
        "factorised_layers": len(ranks),
        "dense_layers": len(dense),
        "ranks": {"min": min(ranks.values()), "max": max(ranks.values())},
    }


def targeted_layers(
    model: torch.nn.Module, targets: list[str]
) -> list[tuple[str, torch.nn.Linear]]:
    """``(name, layer)`` of every decoder linear layer whose projection is in ``targets``."""
    return [
        (f"model.layers.{index}.{name}", module)
        for index, layer in enumerate(model.model.layers)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets
    ]


def cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of ``hessian`` dampened by ``DAMPENING`` of its mean diagonal
    (in float64: calibration inputs are often nearly rank-deficient)."""
    hessian = hessian.double()
    damp = DAMPENING * hessian.diagonal().mean()
    factor = torch.linalg.cholesky(hessian + damp * torch.eye(len(hessian), dtype=hessian.dtype))
    return factor.float()


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values hold ``energy`` of the squared total."""
    squared = singular_values.double().pow(2)
    kept = squared.cumsum(0) / squared.sum()
    return int((kept < energy).sum()) + 1


def break_even(linear: torch.nn.Linear) -> float:
    """The rank at which the two factors hold as many weights as the layer."""
    return linear.in_features * linear.out_features / (linear.in_features + linear.out_features)


def nothing_shrinks(
    model: torch.nn.Module, settings: LowRankSettings, dense: list[tuple[str, int]]
) -> str:
    """The refusal when no targeted layer would get smaller, with the ranks that would."""
    below = min(int(break_even(linear)) for _, linear in targeted_layers(model, settings.targets))
    if settings.rank is not None:
        return (
            f"low_rank.rank {settings.rank} shrinks none of the {len(dense)} targeted layers: "
            f"a layer saves weights only below rank in*out/(in+out); set a rank of at most {below}"
        )
    kept = sorted(rank for _, rank in dense)
    return (
        f"low_rank.energy {settings.energy} keeps ranks {kept[0]}-{kept[-1]} in the "
        f"{len(dense)} targeted layers, none below its break-even rank (at least {below}): "
        f"lower energy, or set low_rank.rank to at most {below}"
    )
