"""Every knob of the training stage, in one typed config."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rayllm.config import StageConfig
from rayllm.model.config import ModelConfig


class ParallelConfig(StageConfig):
    """How the model is spread over the workers: one device mesh of
    ``pp x dp_replicate x dp_shard x tp`` ranks, or DeepSpeed ZeRO.

    ``strategy`` says how the data-parallel ranks hold the model: ``ddp`` every rank all of it
    (PyTorch DDP), ``fsdp`` sharded (FSDP2 ``fully_shard``; with ``dp_replicate`` > 1, sharded
    within groups and replicated across them: HSDP), ``zero`` DeepSpeed ZeRO (stage 1 shards
    optimizer state, 2 also gradients, 3 also parameters). ``tp`` and ``pp`` split each
    data-parallel replica further; the data-parallel size is what remains of the workers.
    """

    strategy: Literal["ddp", "fsdp", "zero"] = "zero"
    tp: int = 1
    """Tensor-parallel size: attention heads, KV heads and MLP channels split over this many ranks."""
    sequence_parallel: bool = False
    """With tp > 1, also split the norms' activations along the sequence."""
    pp: int = 1
    """Pipeline-parallel size: the layers split into this many stages."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """``interleaved_1f1b`` gives each rank two stages (of ``2 x pp``), shrinking the bubble."""
    pp_microbatches: int | None = None
    """Micro-batches the pipeline splits each micro-batch into; default: ``pp``."""
    dp_replicate: int = 1
    """With ``fsdp``: replicate groups (HSDP); the data-parallel ranks are split into this many."""
    fsdp_offload: bool = False
    """With ``fsdp``: keep parameters, gradients and optimizer state on the CPU (FSDP2 offload)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    """With ``zero``: keep optimizer state on the CPU (ZeRO-Offload); uses DeepSpeed's CPU Adam."""
    offload_params: bool = False
    """With ``zero`` stage 3: keep parameters on the CPU too (ZeRO-Infinity)."""

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if min(self.tp, self.pp, self.dp_replicate) < 1:
            raise ValueError(
                "parallel.tp, parallel.pp and parallel.dp_replicate must be at least 1"
            )
        zero = self.strategy == "zero"
        if self.offload_optimizer and (not zero or self.zero_stage == 0):
            raise ValueError("offload_optimizer needs strategy 'zero' with zero_stage 1, 2 or 3")
        if self.offload_params and (not zero or self.zero_stage != 3):
            raise ValueError("offload_params needs strategy 'zero' with zero_stage 3")
        if zero and (self.tp > 1 or self.pp > 1):
            raise ValueError(
                "DeepSpeed ZeRO runs without tensor or pipeline parallelism here (ZeRO-2/3 do "
                "not compose with pipelines); use strategy 'fsdp' (or 'ddp') with tp / pp"
            )
        if self.fsdp_offload and self.strategy != "fsdp":
            raise ValueError("fsdp_offload needs strategy 'fsdp'")
        if self.dp_replicate > 1 and self.strategy != "fsdp":
            raise ValueError("dp_replicate (HSDP) needs strategy 'fsdp'; 'ddp' replicates already")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")
        if self.pp_microbatches is not None and self.pp == 1:
            raise ValueError("pp_microbatches needs pp > 1")
        return self

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or self.pp

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.pp_schedule == "interleaved_1f1b" else 1

    def describe(self) -> str:
        """A short name for logs: ``fsdp``, ``fsdp x tp2 + sp``, ``zero-3 + offload``, ..."""
        if self.strategy == "zero":
            name = f"zero-{self.zero_stage}"
            offloads = [k for k in ("optimizer", "params") if getattr(self, f"offload_{k}")]
            return name + (f" + {'/'.join(offloads)} offload" if offloads else "")
        parts = [self.strategy if self.dp_replicate == 1 else f"hsdp{self.dp_replicate}"]
        parts[0] += " + offload" * self.fsdp_offload
        parts += [f"tp{self.tp}" + " + sp" * self.sequence_parallel] * (self.tp > 1)
        parts += [f"pp{self.pp} {self.pp_schedule}"] * (self.pp > 1)
        return " x ".join(parts)


class LoraSettings(StageConfig):
    """Low-rank adapters (peft's LoRA) on the named linear layers; every other weight frozen."""

    r: int = Field(8, ge=1)
    alpha: float = 16.0
    """The adapters' output is scaled by ``alpha / r``."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Names of the linear layers adapted, as in Hugging Face's Llama (``q_proj`` ...
    ``down_proj``)."""
    quantize_base: bool = False
    """QLoRA: the frozen weights of every linear layer of the decoder blocks held in 4-bit
    NormalFloat (torchao's NF4: blocks of 64 weights, their scales quantized too) and
    dequantized for each matmul; the adapters, norms, embedding and head stay in full
    precision. Trains with ``parallel.strategy: ddp``."""

    @model_validator(mode="after")
    def _check_targets(self) -> LoraSettings:
        unknown = sorted(set(self.target_modules) - set(LINEAR_LAYERS))
        if unknown or not self.target_modules:
            raise ValueError(
                f"lora.target_modules {unknown or '[]'}: the model's linear layers are "
                f"{', '.join(LINEAR_LAYERS)}"
            )
        return self


class PromptSettings(StageConfig):
    """Virtual tokens before every example, the model frozen."""

    num_virtual_tokens: int = Field(20, ge=1)
    kind: Literal["prompt", "prefix"] = "prompt"
    """``prompt``: prompt tuning, their embeddings learnt; ``prefix``: prefix tuning, the keys
    and values every layer's attention reads at them learnt (rayllm finetune sets it from
    ``method``)."""


def check_qlora_layout(parallel: ParallelConfig) -> None:
    """QLoRA's 4-bit base takes plain data parallelism only."""
    if parallel.strategy != "ddp" or parallel.tp > 1 or parallel.pp > 1:
        raise ValueError(
            "lora.quantize_base (QLoRA) trains with parallel.strategy=ddp and tp = pp = 1: the "
            "4-bit base weights are torchao NF4 tensors, which DDP replicates as they are but "
            "DeepSpeed cannot flatten, FSDP2 can only shard when every layer's blocks split "
            "evenly over the ranks, and tensor and pipeline plans do not split"
        )


NF4_BLOCK = 64
"""Weights per 4-bit block of QLoRA's NF4 base, each block with its own scale."""


def check_nf4_blocks(model: ModelConfig) -> None:
    """QLoRA's 4-bit base holds every projection of the decoder blocks in whole blocks."""
    q_width, kv_width = model.n_heads * model.head_size, model.n_kv_heads * model.head_size
    sizes = {
        "q_proj and o_proj": model.dim * q_width,
        "k_proj and v_proj": model.dim * kv_width,
        "gate_proj, up_proj and down_proj": model.dim * model.ffn_dim,
    }
    for names, size in sizes.items():
        if size % NF4_BLOCK:
            raise ValueError(
                f"lora.quantize_base: {names} have {size} weights each, not a multiple of NF4's "
                f"blocks of {NF4_BLOCK}; train this model without quantize_base"
            )


PROMPT_NEEDS_DATA_PARALLEL = (
    "prompt and prefix tuning train with data parallelism (ddp, fsdp or zero): the virtual "
    "tokens are found from the token ids, which only the first pipeline stage reads, and extend "
    "the embedding or the key and value projections, which tensor parallelism splits; set tp "
    "and pp to 1"
)

LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainConfig(StageConfig):
    work_paths: ClassVar[dict[str, str]] = {"data": "data", "output": "model", "storage": "runs"}

    data: str | None = None
    """The folder (or fsspec URL) of a finished `rayllm data` run; default rayllm-work/data
    (in the lifecycle: what its data stage wrote)."""
    output: str | None = None
    """Where the trained model goes, in Hugging Face format with its tokenizer and chat
    template; default rayllm-work/model."""
    overwrite: bool = False
    """Replace ``output`` even when it holds something rayllm did not write."""
    storage: str | None = None
    """Where Ray Train keeps checkpoints and results (any fsspec URL Ray Train accepts);
    default rayllm-work/runs."""
    run_name: str = "rayllm-pretrain"
    model: ModelConfig = ModelConfig()
    init_from: str | None = None
    """A Hugging Face Llama folder (any fsspec URL) whose weights the model starts from instead
    of a random init; its shape must be ``model``'s. ``rayllm finetune`` sets it."""
    lora: LoraSettings | None = None
    """Train LoRA adapters only, the model's own weights frozen (with ``init_from``)."""
    prompt: PromptSettings | None = None
    """Prompt or prefix tuning: train what virtual tokens add only (their ids are from
    ``model.vocab_size`` up, which the examples carry; ``rayllm finetune --set method=prompt``
    or ``prefix`` packs them before each)."""
    objective: Literal["next_token", "dpo", "distill"] = "next_token"
    """``dpo``: Direct Preference Optimization on packed preference pairs (``rayllm
    finetune`` packs them), against the starting weights' log-probabilities; ``distill``:
    next-token loss mixed with the KL divergence from ``teacher``'s predictions."""
    dpo_beta: float = Field(0.1, gt=0)
    """How far DPO lets the model move from the starting weights (the KL penalty's weight)."""
    teacher: str | None = None
    """distill: a Hugging Face Llama folder (any fsspec URL) whose logits the model learns
    from; its tokenizer must be the data's and its vocabulary the model's. Every worker holds a
    frozen copy. ``rayllm compress --set method=distill`` sets it from a registry version."""
    distill_alpha: float = Field(0.5, ge=0, le=1)
    """distill: the KL term's share of the loss (0: the model alone, on the data)."""
    distill_temperature: float = Field(2.0, gt=0)
    """distill: both distributions are softened by it before they are compared."""
    parallel: ParallelConfig = ParallelConfig()
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers over the cluster's nodes (Ray Train's): PACK fills as few
    nodes as it can, SPREAD puts them on different nodes where it can, STRICT_SPREAD waits
    until each has a node of its own."""
    use_gpu: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """bf16: autocast for ddp / tp / pp, bf16 compute with fp32 reductions and master weights
    for fsdp, DeepSpeed's bf16 for zero. fp16 needs GPUs."""
    data_loader: Literal["mmap", "ray_data"] = "mmap"
    """How ranks read the shards: ``mmap``, each rank its slice of a seeded global order from
    memory-mapped shards (every layout sees the same batches; resume is exact), or
    ``ray_data``, streamed through Ray Data (``ray.train.get_dataset_shard``), each rank its
    split; for data-parallel layouts (no tp / pp), resuming skips the batches already seen."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing: every layer (full) or every ``recompute_every``-th (selective)."""
    recompute_every: int = 2
    steps: int = 300
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int | None = None
    """Linear warm-up steps; default: a tenth of ``steps``."""
    lr_schedule: Literal["cosine", "wsd"] = "cosine"
    """After warm-up: cosine decay to ``min_learning_rate``, or warmup-stable-decay (constant,
    then a linear decay over the last ``decay_fraction`` of the steps)."""
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 1
    """Restarts from the latest checkpoint after a worker dies."""
    resume: bool = False
    """Continue the earlier run of this ``run_name`` from its latest checkpoint (it must have
    the same model, parallel layout and data). False starts over, replacing that run."""
    peak_tflops_per_worker: float | None = None
    """Peak dense TFLOP/s of one worker's device, for MFU; default: measured by a short
    matmul probe on each worker at start."""
    timeout_s: int = 600
    """Collective-operation timeout: a hung worker fails the run instead of stalling it."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps < 1 or self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("steps, micro_batch_size and grad_accum_steps must be at least 1")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError(
                "precision fp16 needs GPUs (CPUs have no fp16 matmuls); use bf16 or fp32 on CPU"
            )
        if self.precision == "fp16" and self.parallel.strategy != "zero":
            raise ValueError(
                "precision fp16 needs loss scaling, which rayllm takes from DeepSpeed: use "
                "strategy 'zero', or bf16"
            )
        if self.data_loader == "ray_data" and (self.parallel.tp > 1 or self.parallel.pp > 1):
            raise ValueError(
                "data_loader ray_data gives every rank its own batches, but tensor and pipeline "
                "ranks must share theirs; use data_loader mmap with tp / pp"
            )
        if self.lora is not None and self.lora.quantize_base:
            check_qlora_layout(self.parallel)
            check_nf4_blocks(self.model)
        if self.prompt is not None and self.lora is not None:
            raise ValueError("prompt and lora each train the one part they add: set one of them")
        if self.prompt is not None and (self.parallel.tp > 1 or self.parallel.pp > 1):
            raise ValueError(PROMPT_NEEDS_DATA_PARALLEL)
        if self.objective == "dpo" and self.init_from is None:
            raise ValueError(
                "objective dpo needs init_from (the starting weights are its reference)"
            )
        if self.objective == "distill" and self.teacher is None:
            raise ValueError("objective distill needs a teacher (a Hugging Face folder or URL)")
        if self.recompute_every < 1:
            raise ValueError("recompute_every must be at least 1")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError("decay_fraction must be in (0, 1]")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be at least 0 and below steps "
                f"({self.steps}); lower warmup_steps or leave it unset (a tenth of steps)"
            )
        return self

    @property
    def warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps
