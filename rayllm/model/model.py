"""A Llama-style decoder: RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP.

Only the model lives here; parallelism is applied from outside (``rayllm.train.parallelize``).
Module names follow Hugging Face's ``LlamaForCausalLM`` so a checkpoint maps onto it by
adding a prefix (``rayllm.model.hf``), and vLLM serves it as a Llama.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rayllm.model.config import IGNORED, ModelConfig


def rotary_tables(config: ModelConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables of rotary position embedding, laid out as Hugging Face's Llama does."""
    half = config.head_size // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # Head counts follow from the projections' widths, so a tensor-parallel rank that
        # holds some of the heads runs this code unchanged.
        self.head_dim = config.head_size
        q_dim, kv_dim = config.n_heads * config.head_size, config.n_kv_heads * config.head_size
        self.q_proj = nn.Linear(config.dim, q_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Token ids ``[batch, seq]`` in, next-token logits ``[batch, seq, vocab]`` out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        # A dict keyed "0", "1", ...: a pipeline stage deletes the layers it does not run and
        # the rest keep their names (and their Hugging Face names).
        self.layers = nn.ModuleDict({str(i): Block(config) for i in range(config.n_layers)})
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rotary_tables(config, config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            scale = (
                1 / math.sqrt(2 * self.config.n_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else 1
            )
            nn.init.normal_(param, mean=0.0, std=std * scale)

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """A pipeline stage sets the parts it does not hold to None: the first stage takes
        token ids, later stages take the previous stage's hidden states.

        ``segments`` (``[batch, seq]``, optional) numbers the examples packed into each row:
        a token attends only to earlier tokens of its own segment, and positions restart at
        each segment, so every example is computed as if it were alone."""
        seq = tokens.shape[1]
        cos, sin, mask = self.rope_cos[:seq], self.rope_sin[:seq], None
        if segments is not None:
            positions = positions_in_segments(segments)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            mask = segment_mask(segments)
        x = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        for layer in self.layers.values():
            x = layer(x, cos, sin, mask)
        if self.lm_head is None:
            return x
        return self.lm_head(self.norm(x))


def positions_in_segments(segments: torch.Tensor) -> torch.Tensor:
    """Each token's position within its segment: 0, 1, 2, ... restarting where a segment does."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, seq, seq]``: causal attention within each segment only."""
    seq = segments.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segments.device).tril()
    return (segments[:, :, None] == segments[:, None, :]).logical_and(causal).unsqueeze(1)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``targets`` (the inputs shifted by one), over the
    targets that are not :data:`IGNORED`."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORED)
