"""Hugging Face format of the rayllm decoder: LlamaForCausalLM's config and weight names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, save_file

from rayllm.errors import RayllmError
from rayllm.model.config import ModelConfig
from rayllm.paths import filesystem

if TYPE_CHECKING:  # imported where a config is written: seconds saved in every training worker
    from transformers import LlamaConfig


def to_hf_config(
    config: ModelConfig,
    *,
    bos_token_id: int,
    eos_token_id: int,
    dtype: torch.dtype = torch.float32,
) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_size,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    )


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """rayllm names -> LlamaForCausalLM names: everything but the head lives under ``model.``."""
    return {
        (name if name.startswith("lm_head.") else f"model.{name}"): tensor.detach().contiguous()
        for name, tensor in state.items()
    }


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM names -> rayllm names; a tied head (not stored) is the embedding."""
    state = {name.removeprefix("model."): tensor for name, tensor in state.items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()
    return state


def head_width(hf_config: dict[str, Any]) -> int:
    """The width of one attention head of a Llama ``config.json``: its ``head_dim``, or the
    model's width split over its heads where it names none."""
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


def from_hf_config(hf_config: dict[str, Any]) -> ModelConfig:
    """The rayllm shape of a Hugging Face Llama ``config.json``; other architectures (and Llama
    variants rayllm's decoder does not compute: biases, rope scaling) are refused."""
    architectures = hf_config.get("architectures") or [hf_config.get("model_type")]
    unsupported = [
        key
        for key in ("attention_bias", "mlp_bias", "rope_scaling")
        if hf_config.get(key) not in (None, False)
    ]
    if architectures[0] != "LlamaForCausalLM" or unsupported:
        raise RayllmError(
            f"rayllm trains Llama decoders (LlamaForCausalLM without {', '.join(unsupported)}); "
            f"this model is {architectures[0]}"
            + (f" with {', '.join(unsupported)}" if unsupported else "")
        )
    dim, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = head_width(hf_config)
    return ModelConfig(
        vocab_size=hf_config["vocab_size"],
        dim=dim,
        n_layers=hf_config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=None if head_dim * heads == dim else head_dim,
        ffn_dim=hf_config["intermediate_size"],
        max_seq_len=hf_config["max_position_embeddings"],
        rope_theta=hf_config.get("rope_theta", 10_000.0),
        norm_eps=hf_config.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )


def read_hf_model(url: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The shape and fp32 weights (rayllm names) of the Hugging Face Llama folder at ``url``
    (any fsspec URL), read shard by shard."""
    fs, path = filesystem(url)
    hf_config = json.loads(fs.cat_file(f"{path}/config.json"))
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".safetensors"))
    if not files:
        raise RayllmError(f"{url} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state |= {k: v.float() for k, v in load(fs.cat_file(file)).items()}
    return from_hf_config(hf_config), from_hf_state_dict(state)


def save_hf_model(
    folder: str | Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    *,
    bos_token_id: int,
    eos_token_id: int,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write config.json, generation_config.json and model.safetensors (in ``dtype``) into
    ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = to_hf_config(
        config, bos_token_id=bos_token_id, eos_token_id=eos_token_id, dtype=dtype
    )
    hf_config.save_pretrained(folder)
    if config.tie_embeddings:  # stored once, as transformers stores a tied head
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    tensors = {k: v.to(dtype).cpu() for k, v in to_hf_state_dict(state).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id).save_pretrained(folder)


def weights_dtype(folder: Path) -> torch.dtype:
    """The dtype a Hugging Face folder's ``config.json`` says its weights are stored in:
    bfloat16, or float32 for anything else (what a model derived from it is saved in)."""
    config = json.loads((folder / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype")
    return torch.bfloat16 if stored == "bfloat16" else torch.float32
