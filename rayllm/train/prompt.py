"""Virtual tokens, with every weight of the model frozen: prompt tuning (Lester et al., 2021)
learns their embeddings, prefix tuning (Li and Liang, 2021) the keys and values every layer's
attention reads at them.

The virtual tokens are token ids past the vocabulary (``vocab_size + i`` is the ``i``-th), which
``rayllm finetune`` packs in front of each example; positions restart at each example, so an
example reads its virtual tokens at positions ``0 .. n - 1`` and its own tokens after them,
which is what peft computes for either adapter on the Hugging Face base. The results are saved
in peft's layout (``prompt_embeddings``), which peft loads; vLLM serves neither."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rayllm.model.model import Transformer, apply_rotary
from rayllm.train.config import PromptSettings


def virtual_tokens(vocab_size: int, settings: PromptSettings) -> list[int]:
    """The ids of the virtual tokens, in the order an example reads them."""
    return list(range(vocab_size, vocab_size + settings.num_virtual_tokens))


def add_virtual_tokens(model: Transformer, settings: PromptSettings) -> Transformer:
    """Every weight frozen; what ``settings.kind`` learns added. Both start from the base's
    own view of vocabulary tokens drawn with the run's seed (peft's ``SAMPLE_VOCAB`` for
    prompts; for prefixes, those tokens' keys and values, as Li and Liang recommend), not
    from random vectors outside the range the model reads."""
    model.requires_grad_(False)
    rows = torch.randint(0, model.config.vocab_size, (settings.num_virtual_tokens,))
    if settings.kind == "prompt":
        embedding = model.embed_tokens
        model.embed_tokens = VirtualTokenEmbedding(embedding, embedding.weight.detach()[rows])
        return model
    starts = keys_and_values(model, rows)
    slots = VirtualSlots(model.config.vocab_size)
    model.register_forward_pre_hook(slots.find)
    for index, block in model.layers.items():
        for name in ("k_proj", "v_proj"):
            base = getattr(block.self_attn, name)
            setattr(block.self_attn, name, PrefixProjection(base, slots, starts[index, name]))
    return model


class VirtualTokenEmbedding(nn.Module):
    """Prompt tuning: the model's token embedding and, after its vocabulary, the learned
    virtual tokens."""

    def __init__(self, embedding: nn.Embedding, prompt_embeddings: torch.Tensor):
        super().__init__()
        self.embedding = embedding  # a tied head keeps sharing its weight
        self.prompt_embeddings = nn.Parameter(prompt_embeddings.clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        vocab = self.embedding.num_embeddings
        virtual = tokens >= vocab
        real = self.embedding(tokens.masked_fill(virtual, 0))
        prompts = self.prompt_embeddings[(tokens - vocab).clamp(min=0)]
        return torch.where(virtual.unsqueeze(-1), prompts.to(real.dtype), real)


class VirtualSlots:
    """Prefix tuning: where a batch's virtual tokens are (``index``: the virtual token at each
    position, -1 at real ones), found from the token ids before the model runs; the ids
    themselves become 0, as the embedding of a virtual token is never read."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.index: torch.Tensor | None = None

    def find(self, model: nn.Module, args: tuple) -> tuple:
        tokens, *rest = args
        virtual = tokens >= self.vocab_size
        self.index = torch.where(virtual, tokens - self.vocab_size, -1)
        return (tokens.masked_fill(virtual, 0), *rest)


class PrefixProjection(nn.Module):
    """A key or value projection whose output at the virtual tokens is learned: the keys
    before rotary embedding (rotated by their positions as the model's own keys are)."""

    def __init__(self, projection: nn.Linear, slots: VirtualSlots, prefix: torch.Tensor):
        super().__init__()
        self.projection = projection
        self.slots = slots
        self.prefix = nn.Parameter(prefix.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.projection(x)
        index = self.slots.index
        learned = self.prefix[index.clamp(min=0)].to(out.dtype)
        return torch.where((index >= 0).unsqueeze(-1), learned, out)


@torch.no_grad()
def keys_and_values(
    model: Transformer, tokens: torch.Tensor
) -> dict[tuple[str, str], torch.Tensor]:
    """Each layer's key and value projections of ``tokens`` read as one sequence."""
    seen: dict[tuple[str, str], torch.Tensor] = {}
    hooks = [
        getattr(block.self_attn, name).register_forward_hook(
            lambda module, args, out, key=(index, name): seen.__setitem__(key, out[0])
        )
        for index, block in model.layers.items()
        for name in ("k_proj", "v_proj")
    ]
    model(tokens.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return seen


def save_virtual_token_adapter(
    model: Transformer, settings: PromptSettings, folder: Path, base: str
) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as peft's ``save_pretrained``
    writes a prompt- or prefix-tuning adapter of a LlamaForCausalLM ``base``. peft holds a
    prefix as each virtual token's keys and values of every layer in one row, the keys
    rotated (they are what its cache replays)."""
    from peft import PrefixTuningConfig, PromptTuningConfig

    config = model.config
    n = settings.num_virtual_tokens
    common = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "num_virtual_tokens": n,
        "num_layers": config.n_layers,
        "num_transformer_submodules": 1,
    }
    if settings.kind == "prompt":
        rows = model.embed_tokens.prompt_embeddings.detach()
        adapter = PromptTuningConfig(
            **common,
            token_dim=config.dim,
            num_attention_heads=config.n_heads,
            prompt_tuning_init="SAMPLE_VOCAB",
        )
    else:
        cos, sin = model.rope_cos[:n].unsqueeze(1), model.rope_sin[:n].unsqueeze(1)
        per_layer = []
        for block in model.layers.values():
            keys = block.self_attn.k_proj.prefix.detach().view(n, config.n_kv_heads, -1)
            per_layer += [apply_rotary(keys, cos, sin), block.self_attn.v_proj.prefix.detach()]
        rows = torch.cat([part.reshape(n, -1) for part in per_layer], dim=1)
        width = config.n_kv_heads * config.head_size
        adapter = PrefixTuningConfig(
            **common,
            token_dim=width,
            num_attention_heads=config.n_kv_heads,
            encoder_hidden_size=width,
        )
    folder.mkdir(parents=True, exist_ok=True)
    weights = {"prompt_embeddings": rows.float().contiguous()}
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter.save_pretrained(str(folder))
