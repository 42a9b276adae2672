"""The decoder's shape: a plain config, importable without torch (the CLI checks it early)."""

from __future__ import annotations

from pydantic import model_validator

from rayllm.config import StageConfig

IGNORED = -100
"""A target that is not trained on (a prompt token of fine-tuning data, or padding): the loss
skips it."""

# vLLM's CPU attention kernels accept these head sizes only.
SERVABLE_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ModelConfig(StageConfig):
    """Shape of the decoder. ``vocab_size=0`` means: take it from the tokenizer."""

    vocab_size: int = 0
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    """Width of each attention head; default dim / n_heads. A model that lost heads to pruning
    keeps its heads' width, so its heads span less than dim."""
    ffn_dim: int = 704
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    """The output head is the token embedding (one matrix for both, as SmolLM2 has it)."""

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads")
        if self.head_size not in SERVABLE_HEAD_DIMS:
            given = "head_dim" if self.head_dim else "dim/n_heads"
            raise ValueError(
                f"head size {given} = {self.head_size} cannot be served by vLLM; "
                f"choose it to be one of {SERVABLE_HEAD_DIMS}"
            )
        return self

    @property
    def head_size(self) -> int:
        """Width of each attention head: head_dim, or dim / n_heads."""
        return self.head_dim or self.dim // self.n_heads

    def num_params(self, vocab_size: int | None = None) -> int:
        v = vocab_size or self.vocab_size
        embeddings = (1 if self.tie_embeddings else 2) * v * self.dim
        return embeddings + self.n_layers * self.layer_params() + self.dim

    def layer_params(self) -> int:
        q, kv = self.n_heads * self.head_size, self.n_kv_heads * self.head_size
        attention = 2 * self.dim * q + 2 * self.dim * kv
        return attention + 3 * self.dim * self.ffn_dim + 2 * self.dim

    def flops_per_token(self, seq_len: int, frozen: bool = False) -> float:
        """Training FLOPs per token: 6N for the matmuls plus the attention scores (PaLM, app. B).
        ``frozen`` weights (LoRA's base) skip their gradients: 4N. N counts the layers and the
        output head, tied or not; the embedding lookup is free."""
        n_matmul = self.vocab_size * self.dim + self.n_layers * self.layer_params() + self.dim
        return (4 if frozen else 6) * n_matmul + 12 * self.n_layers * self.dim * seq_len
