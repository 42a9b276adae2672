"""Prompt tuning (Lester et al., 2021): a few learned embeddings, "virtual tokens", put before
every example, with every weight of the model frozen.

The virtual tokens are token ids past the vocabulary (``vocab_size + i`` is the ``i``-th), which
``rayllm finetune`` packs in front of each example; positions restart at each example, so an
example reads its virtual tokens at positions ``0 .. n - 1`` and its own tokens after them,
which is what peft computes for the adapter on the Hugging Face base. The result is saved in
peft's layout (``prompt_embeddings``), which peft loads; vLLM serves no prompt adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rayllm.model.model import Transformer
from rayllm.train.config import PromptSettings


class VirtualTokenEmbedding(nn.Module):
    """The model's token embedding and, after its vocabulary, the learned virtual tokens."""

    def __init__(self, embedding: nn.Embedding, prompt_embeddings: torch.Tensor):
        super().__init__()
        self.embedding = embedding  # a tied head keeps sharing its weight
        self.prompt_embeddings = nn.Parameter(prompt_embeddings)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        vocab = self.embedding.num_embeddings
        virtual = tokens >= vocab
        real = self.embedding(tokens.masked_fill(virtual, 0))
        prompts = self.prompt_embeddings[(tokens - vocab).clamp(min=0)]
        return torch.where(virtual.unsqueeze(-1), prompts.to(real.dtype), real)


def add_prompt(model: Transformer, settings: PromptSettings) -> Transformer:
    """Every weight frozen; the virtual tokens start as copies of vocabulary rows drawn with the
    run's seed (peft's ``SAMPLE_VOCAB``: a start inside the embeddings' range, which random
    vectors of unit scale are not)."""
    model.requires_grad_(False)
    embedding = model.embed_tokens
    rows = torch.randint(0, embedding.num_embeddings, (settings.num_virtual_tokens,))
    model.embed_tokens = VirtualTokenEmbedding(embedding, embedding.weight.detach()[rows].clone())
    return model


def virtual_tokens(vocab_size: int, settings: PromptSettings) -> list[int]:
    """The ids of the virtual tokens, in the order an example reads them."""
    return list(range(vocab_size, vocab_size + settings.num_virtual_tokens))


def save_prompt_adapter(model: Transformer, folder: Path, base: str) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as peft's ``save_pretrained``
    writes a prompt-tuning adapter of a LlamaForCausalLM ``base``."""
    from peft import PromptTuningConfig

    prompt = model.embed_tokens.prompt_embeddings.detach().float().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "adapter_model.safetensors"
    save_file({"prompt_embeddings": prompt}, str(weights), metadata={"format": "pt"})
    PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prompt.shape[0],
        token_dim=prompt.shape[1],
        num_transformer_submodules=1,
        num_attention_heads=model.config.n_heads,
        num_layers=model.config.n_layers,
        prompt_tuning_init="SAMPLE_VOCAB",
        base_model_name_or_path=base,
    ).save_pretrained(str(folder))
