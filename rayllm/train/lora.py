"""LoRA on rayllm's decoder through peft: adapters are injected in place, so the model keeps
its parameter names (the adapted layers gain ``base_layer`` and ``lora_A`` / ``lora_B``) and
every parallel plan that wraps whole layers applies unchanged. A trained adapter is saved in
peft's layout for the Hugging Face Llama the decoder maps onto, which transformers, peft and
vLLM load against the base version; or merged into full weights.

peft is imported by the functions that use it: with transformers, it would add seconds to the
start of every training worker, and most runs train no adapter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from rayllm.model.model import Transformer
from rayllm.train.config import NF4_BLOCK, LoraSettings

if TYPE_CHECKING:
    from peft import LoraConfig

HF_PREFIX = "base_model.model.model."
"""Where peft puts the decoder's layers of a LlamaForCausalLM (PeftModel > Llama > model)."""


def peft_config(settings: LoraSettings, base: str = "") -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base or None,
    )


def add_lora(model: Transformer, settings: LoraSettings) -> Transformer:
    """Adapters on ``settings.target_modules``; every other parameter frozen (and the decoder
    blocks' linear weights in 4 bits with ``quantize_base``)."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(peft_config(settings), model)
    if settings.quantize_base:
        quantize_frozen_base(model)
    return model


def quantize_frozen_base(model: Transformer) -> None:
    """QLoRA's base: each frozen linear weight of the decoder blocks becomes torchao's
    ``NF4Tensor``, which ``F.linear`` dequantizes for the matmul and its backward (the weight
    gets no gradient). The block scales are quantized in groups of up to 256 blocks, fewer
    where a layer has fewer."""
    from torchao.quantization import to_nf4

    for module in model.layers.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
            continue
        blocks = module.weight.numel() // NF4_BLOCK  # whole blocks: TrainConfig checks it
        group = 256
        while blocks % group:
            group //= 2
        weight = to_nf4(module.weight.detach(), NF4_BLOCK, group)
        module.weight = torch.nn.Parameter(weight, requires_grad=False)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: Transformer, settings: LoraSettings, folder: Path, base: str) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors``, as peft's ``save_pretrained``
    writes them for a LlamaForCausalLM ``base``."""
    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = {
        HF_PREFIX + name: tensor.detach().float().contiguous()
        for name, tensor in get_peft_model_state_dict(model).items()
    }
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config(settings, base).save_pretrained(str(folder))


def merged_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The full weights with every adapter added in (peft's merge), under the plain names."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return {
        name.replace(".base_layer", ""): tensor
        for name, tensor in model.state_dict().items()
        if ".lora_" not in name
    }
