"""What ``rayllm finetune`` does: which registry version it starts from, on which chat data,
full or LoRA, with which training settings, and the name it publishes the result under."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayllm.config import StageConfig
from rayllm.errors import RayllmError
from rayllm.registry.store import Registry, Version, default_registry
from rayllm.train.config import (
    PROMPT_NEEDS_DATA_PARALLEL,
    LoraSettings,
    ParallelConfig,
    PromptSettings,
    TrainConfig,
    check_qlora_layout,
)


class FinetuneTrainConfig(TrainConfig):
    """The trainer's settings, with defaults for fine-tuning (``model``, ``init_from``,
    ``lora``, ``prompt``, ``data`` and ``output`` are set by ``rayllm finetune`` itself)."""

    run_name: str = "rayllm-finetune"
    parallel: ParallelConfig = ParallelConfig(strategy="ddp")
    steps: int = 100
    micro_batch_size: int = 4
    learning_rate: float = 2e-4
    min_learning_rate: float = 2e-5
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50


class FinetuneConfig(StageConfig):
    """Supervised fine-tuning of a registry version on chat data, on Ray Train."""

    base: str | None = None
    """The registry version fine-tuned (``name``, ``name:3``, ``name@production``; required)."""
    registry: str | None = None
    """Registry root, any fsspec URL; default: $RAYLLM_REGISTRY, else rayllm-work/registry."""
    data: str = "chat"
    """JSON lines of ``messages``, or of ``prompt`` and ``response`` (dpo: of ``prompt``,
    ``chosen`` and ``rejected``): a file, folder, glob or URL, or the built-in ``chat``
    (chatterbot-corpus's questions and answers)."""
    objective: Literal["sft", "dpo"] = "sft"
    """``sft``: supervised, on the assistant turns of ``data``; ``dpo``: Direct Preference
    Optimization on preference pairs (``data``: JSON lines of ``prompt``, ``chosen`` and
    ``rejected``, or ``chat`` for pairs built from the built-in corpus: each question's own
    answer chosen, another's rejected)."""
    beta: float = Field(0.1, gt=0)
    """dpo: how far the model may move from the base (the weight of DPO's KL penalty)."""
    name: str | None = None
    """The registry name the result is published under; default: the base's name +
    ``-sft`` or ``-dpo``."""
    method: Literal["lora", "full", "prompt", "prefix"] = "lora"
    """``lora``: train low-rank adapters and publish them as an adapter of the base version
    (served by multi-LoRA); ``full``: train every weight and publish a full model; ``prompt``
    and ``prefix``: prompt or prefix tuning, virtual tokens before every example (their
    embeddings, or every layer's keys and values at them, learnt), published as a peft adapter
    of the base (which peft loads; vLLM serves neither)."""
    lora: LoraSettings = LoraSettings()
    prompt: PromptSettings = PromptSettings()
    """method prompt or prefix: ``num_virtual_tokens`` (``kind`` follows ``method``)."""
    untie_embeddings: bool = False
    """method full, on a base whose output head is its token embedding (SmolLM2): train the
    head as its own matrix, starting as a copy of the embedding; the result has its own head
    (vocabulary x dim more weights). Off: the tied matrix trains as one, under any layout."""
    seq_len: int = Field(256, ge=8)
    """Tokens per packed row; every example fits in one row (or is cut to it)."""
    strict: bool = False
    """Refuse examples longer than ``seq_len`` instead of cutting them (and counting them)."""
    max_examples: int | None = Field(None, ge=1)
    """Train on at most this many examples (or pairs) of the training share; the held-out
    share stays as it is."""
    safety_mixture: float = Field(0.0, ge=0, lt=1)
    """sft: the share of the training examples drawn from rayllm's safety set (refusals of
    harmful requests, plain answers to harmless ones that sound alarming), repeated as needed;
    its evaluation half stays out (``rayllm eval --set tasks=[safety]``)."""
    held_out: float = Field(0.05, gt=0, lt=0.5)
    """Share of the conversations kept out of training to measure the response loss on."""
    train: FinetuneTrainConfig = FinetuneTrainConfig()

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        defaults = TrainConfig()
        given = [
            key
            for key in (
                *("model", "init_from", "lora", "prompt", "data", "output", "objective"),
                "dpo_beta",
            )
            if getattr(self.train, key) != getattr(defaults, key)
        ]
        if given:
            raise ValueError(
                f"train.{', train.'.join(given)}: set by rayllm finetune from base, method, "
                "lora, prompt, data, objective and beta; set those instead"
            )
        if self.prompt.kind == "prefix" and self.method != "prefix":
            raise ValueError("prompt.kind follows method: set method=prefix for prefix tuning")
        if self.method in ("prompt", "prefix") and self.train.parallel.tp > 1:
            raise ValueError(PROMPT_NEEDS_DATA_PARALLEL)
        if self.untie_embeddings and self.method != "full":
            raise ValueError(
                "untie_embeddings trains the output head apart from the embedding: it needs "
                "method full (an adapter's base keeps its head)"
            )
        if self.lora.quantize_base and self.method != "lora":
            raise ValueError(
                "lora.quantize_base (QLoRA) holds the frozen base under adapters: it needs "
                "method lora"
            )
        if self.lora.quantize_base:
            check_qlora_layout(self.train.parallel)
        if self.safety_mixture and self.objective != "sft":
            raise ValueError("safety_mixture mixes supervised examples: it needs objective sft")
        return self

    def base_version(self) -> Version:
        """The base version, pinned: it must exist and be a full model (read from its manifest,
        nothing downloaded)."""
        if not self.base:
            raise RayllmError(
                "finetune.base is required: the registry version to fine-tune, e.g. "
                "--set base=smollm2 (after `rayllm registry import smollm2 smollm2`)"
            )
        registry = Registry(self.registry or default_registry())
        version = registry.resolve(self.base)
        if "adapter" in version.lineage:
            raise RayllmError(
                f"{version.ref} is an adapter; fine-tune its base {version.lineage['parent']} "
                "(or merge the adapter into a full version first)"
            )
        if self.untie_embeddings and not registry.hf_config(version).get("tie_word_embeddings"):
            raise RayllmError(
                f"finetune.untie_embeddings: {version.ref} has its own output head "
                "already; leave untie_embeddings off"
            )
        return version
