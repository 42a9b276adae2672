"""Random LoRA adapters for tests: what a fine-tune would publish, without the fine-tune."""

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def random_adapter(base: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """A LoRA adapter of the model folder ``base`` with random A and B (peft's default
    starts B at zero, which would change nothing), saved as peft saves one."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out
