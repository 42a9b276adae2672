"""Hugging Face format of the rayllm decoder: LlamaForCausalLM's config and weight names."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from rayllm.model.config import ModelConfig


def to_hf_config(config: ModelConfig, *, bos_token_id: int, eos_token_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """rayllm names -> LlamaForCausalLM names: everything but the head lives under ``model.``."""
    return {
        (name if name.startswith("lm_head.") else f"model.{name}"): tensor.detach().contiguous()
        for name, tensor in state.items()
    }


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def save_hf_model(
    folder: str | Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    *,
    bos_token_id: int,
    eos_token_id: int,
) -> None:
    """Write config.json, generation_config.json and model.safetensors into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = to_hf_config(config, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    hf_config.save_pretrained(folder)
    tensors = {k: v.float().cpu() for k, v in to_hf_state_dict(state).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id).save_pretrained(folder)
