"""Post-training weight quantization of a ``transformers`` causal LM: round-to-nearest or GPTQ,
int4 or int8, per channel or group-wise, written in compressed-tensors' format (what vLLM and
``transformers`` load).

GPTQ is rayllm's own (Frantar et al., 2022, as in the reference code): llmcompressor and
GPTQModel, which carry it, need other compressed-tensors and torch builds than the pinned vLLM.
Its Hessians come from one pass of the unquantized model over the calibration rows (not layer
by layer through the already-quantized ones). compressed-tensors itself computes the scales,
rounds, packs and names the tensors, so the files are exactly what its loaders expect.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.naive_quantized.base import (
    NaiveQuantizationCompressor,
)
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, calculate_range

from rayllm.compress.calibration import calibration_pass
from rayllm.compress.config import QuantizeSettings
from rayllm.errors import RayllmError


def scheme(settings: QuantizeSettings) -> QuantizationScheme:
    """The compressed-tensors scheme of ``settings``, for every ``Linear`` it targets."""
    bits = 4 if settings.scheme == "w4a16" else 8
    grouped = settings.group_size is not None and settings.scheme != "w8a8"
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=True,
        strategy="group" if grouped else "channel",
        group_size=settings.group_size if grouped else None,
    )
    activations = None
    if settings.scheme == "w8a8":
        activations = QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
        )
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)


def quantized_layers(model: torch.nn.Module, group_size: int | None) -> dict[str, torch.nn.Linear]:
    """The decoder's linear layers (not the output head), refusing any whose input size the
    group size does not divide, with the sizes that would."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings()
    }
    if group_size is not None:
        uneven = sorted({m.in_features for m in layers.values() if m.in_features % group_size})
        if uneven:
            fits = [
                g
                for g in (32, 64, 128, 256)
                if all(not (m.in_features % g) for m in layers.values())
            ]
            raise RayllmError(
                f"quantize.group_size {group_size} does not divide the input size of layers "
                f"of {uneven} features: set it to one that divides every layer "
                f"({', '.join(map(str, fits)) or 'none of 32-256'}), or null for one scale "
                "per channel"
            )
    return layers


@torch.no_grad()
def input_hessians(
    model: torch.nn.Module, layers: dict[str, torch.nn.Linear], rows: torch.Tensor, batch: int
) -> dict[str, torch.Tensor]:
    """``2 XᵀX / n`` of each layer's inputs over the calibration rows."""
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def record(name):
        def hook(_, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            n = counts[name]
            hessians[name].mul_(n / (n + len(x))).addmm_(x.T, x, alpha=2 / (n + len(x)))
            counts[name] = n + len(x)

        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in layers.items()]
    calibration_pass(model, rows, batch, handles)
    return hessians


def scales_of(weight: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric scales of ``weight`` (``[rows, 1]`` per channel, ``[rows, groups]``
    group-wise), rounded to the dtype they are saved in."""
    columns = weight.shape[1] if args.group_size is None else args.group_size
    grouped = weight.reshape(weight.shape[0], -1, columns)
    scale, _ = calculate_qparams(grouped.amin(dim=2), grouped.amax(dim=2), args)
    return scale.to(dtype).float()


def rounded(weight: torch.Tensor, scale: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """``weight`` on the quantization grid of ``scale`` (quantized, then dequantized)."""
    zero = torch.zeros_like(scale, dtype=torch.int8)
    return fake_quantize(weight, scale, zero, args)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    settings: QuantizeSettings,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: columns are quantized in order, each one's error spread over the later columns
    by the inverse Hessian. Returns the quantized weight (dequantized) and its scales."""
    weight = weight.clone().float()
    rows, columns = weight.shape
    dead = torch.diag(hessian) == 0
    hessian = hessian.clone()
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += settings.dampening * torch.diag(hessian).mean() * torch.eye(columns)
    inverse = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True
    )
    group = args.group_size or columns
    scale = (
        scales_of(weight, args, dtype)
        if args.group_size is None
        else torch.zeros(rows, columns // group)
    )
    low, high = (float(v) for v in calculate_range(args, weight.device))
    quantized = torch.zeros_like(weight)
    for first in range(0, columns, settings.block_size):
        last = min(first + settings.block_size, columns)
        block = weight[:, first:last].clone()
        errors = torch.zeros_like(block)
        inverse_block = inverse[first:last, first:last]
        for i in range(last - first):
            column = first + i
            if args.group_size is not None and column % group == 0:
                span = torch.cat([block[:, i:], weight[:, last:]], dim=1)[:, :group]
                scale[:, column // group] = scales_of(span, args, dtype)[:, 0]
            s = scale[:, column // group]
            q = torch.clamp(torch.round(block[:, i] / s), low, high) * s
            quantized[:, column] = q
            error = (block[:, i] - q) / inverse_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * inverse_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, last:] -= errors @ inverse[first:last, last:]
    return quantized, scale


def quantize_model(
    model: torch.nn.Module,
    settings: QuantizeSettings,
    calibration: torch.Tensor | None,
    batch_size: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Quantize ``model``'s decoder linear layers in place (their weights become the
    dequantized levels, and w8a8 layers' inputs are rounded per token, so the model measures
    what the saved one computes); returns each layer's scales."""
    quantization = scheme(settings)
    args = quantization.weights
    layers = quantized_layers(model, args.group_size)
    hessians = {}
    if settings.algorithm == "gptq":
        hessians = input_hessians(model, layers, calibration, batch_size)
    scales = {}
    for name, layer in layers.items():
        weight = layer.weight.data.float()
        if settings.algorithm == "gptq":
            quantized, scale = gptq(weight, hessians.pop(name), args, settings, dtype)
        else:
            scale = scales_of(weight, args, dtype)
            quantized = rounded(weight, scale, args)
        layer.weight.data.copy_(quantized)
        scales[name] = scale
        if quantization.input_activations is not None:
            layer.register_forward_pre_hook(per_token_int8)
    return scales


def per_token_int8(_, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A linear layer's input on the int8 grid of each token's own scale: what w8a8 kernels
    compute at run time, so the quantized model measures what it serves."""
    x = inputs[0]
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return (torch.clamp(torch.round(x / scale), -128, 127) * scale, *inputs[1:])


def compressed_state(
    state: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    settings: QuantizeSettings,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's tensors (``state``) as compressed-tensors saves them (int weights packed
    into int32 for 4 bits, int8 for w8a8, scales beside them), and the ``quantization_config``
    for its config.json."""
    quantization = scheme(settings)
    compressor = (
        NaiveQuantizationCompressor if settings.scheme == "w8a8" else PackedQuantizationCompressor
    )
    tensors = {}
    for name, tensor in state.items():
        layer = name.removesuffix(".weight")
        if layer not in scales:
            tensors[name] = tensor.to(dtype)
            continue
        parts = compressor.compress(
            {"weight": tensor.float(), "weight_scale": scales[layer]}, quantization
        )
        for key, value in parts.items():
            tensors[f"{layer}.{key}"] = value.to(dtype) if value.is_floating_point() else value
    config = QuantizationConfig(
        config_groups={"group_0": quantization},
        format="int-quantized" if settings.scheme == "w8a8" else "pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=["lm_head"],
    )
    return tensors, config.to_dict()
