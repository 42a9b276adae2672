"""What ``rayllm compress`` does: which registry version it compresses, by which method and
settings, on which calibration and held-out text, and the name it publishes the result under."""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from pydantic import Field, ValidationError, model_validator

from rayllm.config import StageConfig, describe_validation_error
from rayllm.data.shards import load_manifest
from rayllm.errors import RayllmError
from rayllm.model.config import ModelConfig
from rayllm.registry.store import Registry, Version, default_registry
from rayllm.train.config import ParallelConfig, TrainConfig

Scheme = Literal["w4a16", "w8a16", "w8a8"]
RAYLLM_LAYOUTS = {"low_rank": "low-rank factorised", "share": "weight-shared across layers"}
"""Methods whose result only ``rayllm.compress.modeling_rayllm`` loads (not a Llama)."""


class QuantizeSettings(StageConfig):
    """Post-training quantization of every linear layer of the decoder (the embeddings and
    the output head stay as they are), saved in compressed-tensors' format."""

    scheme: Scheme = "w4a16"
    """``w4a16``: int4 weights; ``w8a16``: int8 weights (both weight-only, activations stay in
    the model's dtype); ``w8a8``: int8 weights and int8 activations, quantized per token at run
    time. vLLM's CPU build runs w4a16 and w8a8; w8a16 needs a GPU."""
    group_size: int | None = Field(128, ge=2)
    """Weights sharing one scale along a row (group-wise); none: one scale per output channel.
    Each layer's input size must be a multiple of it. w8a8 is always per channel."""
    algorithm: Literal["gptq", "rtn"] = "gptq"
    """``gptq``: each column's rounding error is spread over the columns not yet quantized, by
    the inverse Hessian of the layer's calibration inputs (Frantar et al., 2022); ``rtn``:
    round each weight to the nearest level (no calibration)."""
    dampening: float = Field(0.01, gt=0, lt=1)
    """gptq: added to the Hessian's diagonal, as a share of its mean, so it can be inverted."""
    block_size: int = Field(128, ge=1)
    """gptq: columns quantized together before the rest of the layer is updated."""


class PruneSettings(StageConfig):
    """Pruning: zeroing the smallest weights (``unstructured``), or removing whole attention
    heads, MLP channels or layers so the model itself gets smaller."""

    structure: Literal["unstructured", "heads", "channels", "layers"] = "unstructured"
    sparsity: float = Field(0.5, gt=0, lt=1)
    """The share removed: of each linear layer's weights (unstructured, by magnitude), of the
    key-value head groups of every layer (heads), of the MLP channels of every layer
    (channels), or of the layers (layers); each by its importance on the calibration rows."""


Projection = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LowRankSettings(StageConfig):
    """Low-rank factorisation: each targeted linear layer of the decoder becomes two smaller
    ones, the halves of its truncated SVD (a layer the kept rank would not shrink is left
    dense and counted)."""

    rank: int | None = Field(None, ge=1)
    """The rank every factorised layer keeps; unset: chosen per layer by ``energy``."""
    energy: float = Field(0.9, gt=0, lt=1)
    """Without ``rank``: per layer, the smallest rank that keeps this share of the squared
    singular values (the weight's Frobenius energy)."""
    calibrated: bool = True
    """Truncate each layer's SVD by its output on the calibration rows (SVD-LLM's whitening)
    rather than by its weights alone; ``energy`` is then the share of that output's energy."""
    targets: list[Projection] = list(get_args(Projection))
    """The projections factorised, in every decoder layer (not the embeddings or the head)."""

    @model_validator(mode="after")
    def _check(self) -> LowRankSettings:
        if self.rank is not None and "energy" in self.model_fields_set:
            raise ValueError("low_rank.rank and low_rank.energy each choose the rank: set one")
        if not self.targets:
            raise ValueError("low_rank.targets is empty: name at least one projection")
        return self


class ShareSettings(StageConfig):
    """Weight sharing across layers (as ALBERT shares them): each run of ``group`` consecutive
    decoder layers computes with one set of weights, stored once."""

    group: int = Field(2, ge=2)
    """Layers per shared set (the last run may be shorter); the model's layer count: every
    layer shares one set, as in ALBERT."""
    merge: Literal["mean", "first"] = "mean"
    """The shared weights: the mean of the run's layers, or its first layer's."""


class RecoverySettings(StageConfig):
    """A short fine-tune after pruning, factorising or sharing: next-token training of every
    weight on the shard set's training rows, to win back some of what the method cost; in the
    compress task itself (one process, the task's CPUs), or on Ray Train."""

    steps: int = Field(0, ge=0)
    """Optimizer steps; 0: none."""
    learning_rate: float = Field(1e-4, gt=0)
    """AdamW's, after a tenth of the steps of linear warm-up, decayed by a cosine to a tenth."""
    rows_per_step: int = Field(8, ge=1)
    """Rows of the shard set per optimizer step, over all workers."""
    workers: int = Field(0, ge=0)
    """0: in the compress task. 1 or more: a Ray Train run of that many DDP workers (rayllm's
    trainer, checkpoints and all) from the pruned weights, each worker its share of
    ``rows_per_step``; after pruning (heads, channels or layers: shapes rayllm's decoder
    computes), not after low_rank or share."""
    cpus_per_worker: float = Field(1.0, gt=0)
    storage: str | None = None
    """With workers: where the run's checkpoints (and the pruned start) go, any fsspec URL
    every worker reaches; default rayllm-work/runs."""

    def on_ray_train(self) -> bool:
        return self.steps > 0 and self.workers > 0


class StudentShape(StageConfig):
    """The student's shape: the teacher's, except what is set here (by default, half its
    layers)."""

    n_layers: int | None = Field(None, ge=1)
    dim: int | None = Field(None, ge=1)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    ffn_dim: int | None = Field(None, ge=1)

    def of(self, teacher: ModelConfig) -> ModelConfig:
        changes = self.model_dump(exclude_none=True)
        changes.setdefault("n_layers", max(1, teacher.n_layers // 2))
        if changes.keys() & {"dim", "n_heads"}:  # the student's heads span its dim
            changes.setdefault("head_dim", None)
        try:
            return ModelConfig.model_validate(teacher.model_dump() | changes)
        except ValidationError as err:
            raise RayllmError(describe_validation_error(err, "distill.student")) from None


class DistillTrainConfig(TrainConfig):
    """The trainer's settings for the student, with defaults for distillation (``model``,
    ``objective``, ``teacher``, ``data`` and ``output`` are set by ``rayllm compress``)."""

    run_name: str = "rayllm-distill"
    parallel: ParallelConfig = ParallelConfig(strategy="ddp")
    steps: int = 200
    learning_rate: float = 5e-4
    """Lower than pretraining's: the student starts from trained layers (``distill.init``)."""
    min_learning_rate: float = 5e-5
    eval_every: int = 50
    checkpoint_every: int = 100


class DistillSettings(StageConfig):
    """Knowledge distillation: a smaller student trained on Ray Train on the shard set's text,
    against the source (the teacher)'s predictions as well as the text itself."""

    student: StudentShape = StudentShape()
    init: Literal["teacher_layers", "random"] = "teacher_layers"
    """``teacher_layers``: the student starts from the teacher's embeddings, final norm and
    output head and evenly spaced layers of it, first and last kept (as DistilBERT starts its
    student); it must have the teacher's widths and at most its layers. ``random``: a seeded
    random init, for a student of any shape."""
    alpha: float = Field(0.5, ge=0, le=1)
    """The share of the loss that is the KL divergence from the teacher's predictions; the
    rest is the next-token loss. 0 trains the student alone (the baseline at equal compute)."""
    temperature: float = Field(2.0, gt=0)
    """Both models' distributions are softened by it before they are compared."""
    train: DistillTrainConfig = DistillTrainConfig()

    @model_validator(mode="after")
    def _check(self) -> DistillSettings:
        set_here = ("model", "init_from", "lora", "data", "output", "objective", "teacher")
        set_here += ("distill_alpha", "distill_temperature")
        defaults = TrainConfig()
        given = [key for key in set_here if getattr(self.train, key) != getattr(defaults, key)]
        if given:
            raise ValueError(
                f"distill.train.{', distill.train.'.join(given)}: set by rayllm compress from "
                "source, data, distill.student, distill.alpha and distill.temperature; set those "
                "instead"
            )
        return self


class CompressConfig(StageConfig):
    """Compression of a registry version into a new one, with its size and held-out loss
    before and after recorded in the lineage."""

    work_paths: ClassVar[dict[str, str]] = {"data": "data"}

    source: str | None = None
    """The registry version compressed (``name``, ``name:3``, ``name@production``; required)."""
    registry: str | None = None
    """Registry root, any fsspec URL; default: $RAYLLM_REGISTRY, else rayllm-work/registry."""
    method: Literal["quantize", "prune", "distill", "low_rank", "share"] = "quantize"
    quantize: QuantizeSettings = QuantizeSettings()
    prune: PruneSettings = PruneSettings()
    distill: DistillSettings = DistillSettings()
    low_rank: LowRankSettings = LowRankSettings()
    share: ShareSettings = ShareSettings()
    recovery: RecoverySettings = RecoverySettings()
    """After prune (structured), low_rank or share; distillation trains the student already and
    quantization comes last."""
    name: str | None = None
    """The registry name the result is published under; default: the source's name and the
    method's tag (``smollm2-w4a16``, ``smollm2-pruned-heads``, ``smollm2-distilled``,
    ``smollm2-low-rank``, ``smollm2-shared``)."""
    data: str | None = None
    """The shard set (``rayllm data``'s output) whose training split calibrates (distill:
    trains the student) and whose validation split measures the loss; default
    rayllm-work/data. Rows are re-tokenized when the model's tokenizer is not the shards'
    (distill: the shards must be in the source's tokenizer)."""
    calibration_rows: int = Field(64, ge=1)
    """Training rows the calibration reads (GPTQ's Hessians, pruning's importances)."""
    eval_rows: int = Field(128, ge=1)
    """Validation rows the held-out loss is measured on, before and after."""
    batch_size: int = Field(8, ge=1)
    cpus: float = Field(2, gt=0)
    """CPUs of the Ray task that compresses (its torch threads)."""

    @model_validator(mode="after")
    def _check(self) -> CompressConfig:
        quantize = self.quantize
        given = "group_size" in quantize.model_fields_set and quantize.group_size is not None
        if quantize.scheme == "w8a8" and given:
            raise ValueError("w8a8 quantizes weights per channel: leave group_size unset")
        if self.recovery.steps and not self.recovers():
            raise ValueError(
                f"recovery.steps: {self.method}"
                + (" (unstructured)" if self.method == "prune" else "")
                + " has no recovery fine-tune (it would undo the zeros, the rounding, or train "
                "a student twice); recovery follows prune (structured), low_rank or share"
            )
        recovery = self.recovery
        if recovery.on_ray_train():
            if self.method != "prune":
                raise ValueError(
                    f"recovery.workers: {self.method} leaves a model rayllm's trainer does not "
                    "compute (a factorised or shared layout); set recovery.workers=0 to recover "
                    "in the compress task"
                )
            if recovery.rows_per_step % recovery.workers:
                raise ValueError(
                    f"recovery.rows_per_step {recovery.rows_per_step} is not a multiple of "
                    f"recovery.workers {recovery.workers}: each worker takes an equal share"
                )
        return self

    def recovers(self) -> bool:
        """Whether the method's result can be fine-tuned as it is saved."""
        if self.method == "prune":
            return self.prune.structure != "unstructured"
        return self.method in ("low_rank", "share")

    def source_version(self) -> Version:
        """The source version, pinned: it must exist and be a full model."""
        if not self.source:
            raise RayllmError(
                "compress.source is required: the registry version to compress, e.g. "
                "--set source=smollm2 (after `rayllm registry import smollm2 smollm2`)"
            )
        version = self.store().resolve(self.source)
        if "adapter" in version.lineage:
            raise RayllmError(
                f"{version.ref} is an adapter; merge it into a full version before compressing"
            )
        compression = version.lineage.get("compression", {})
        if "quantization" in compression:
            raise RayllmError(
                f"{version.ref} is quantized; compress its parent instead (quantize last)"
            )
        if compression.get("method") in RAYLLM_LAYOUTS:
            raise RayllmError(
                f"{version.ref} is {RAYLLM_LAYOUTS[compression['method']]}, a layout only "
                "transformers loads; compress its parent instead (factorise or share last)"
            )
        return version

    def check_inputs(self) -> Version:
        """The source version, with the shard set's manifest read: what fails before any
        work starts (call on a config with its work paths filled in)."""
        version = self.source_version()
        load_manifest(self.data)
        return version

    def needs_calibration(self) -> bool:
        if self.method == "quantize":
            return self.quantize.algorithm == "gptq"
        if self.method == "low_rank":
            return self.low_rank.calibrated
        return self.method == "prune" and self.prune.structure != "unstructured"

    def result_name(self, version: Version) -> str:
        if self.name:
            return self.name
        if self.method == "quantize":
            return f"{version.name}-{self.quantize.scheme}"
        if self.method == "distill":
            return f"{version.name}-distilled"
        if self.method == "low_rank":
            return f"{version.name}-low-rank"
        if self.method == "share":
            return f"{version.name}-shared"
        return f"{version.name}-pruned-{self.prune.structure}"

    def store(self) -> Registry:
        return Registry(self.registry or default_registry())
