"""The parameter-efficient methods a run may train instead of the whole model: LoRA adapters
(``rayllm.train.lora``), or what prompt or prefix tuning's virtual tokens add
(``rayllm.train.prompt``)."""

from __future__ import annotations

from typing import Any

from rayllm.model.model import Transformer
from rayllm.train.config import LoraSettings, PromptSettings
from rayllm.train.lora import add_lora
from rayllm.train.prompt import add_virtual_tokens


def with_adapters(model: Transformer, lora: Any = None, prompt: Any = None) -> Transformer:
    """``model`` with what a run's ``lora`` or ``prompt`` settings (or their JSON) train, every
    other weight frozen; unchanged without either."""
    if lora:
        return add_lora(model, LoraSettings.model_validate(lora))
    if prompt:
        return add_virtual_tokens(model, PromptSettings.model_validate(prompt))
    return model
