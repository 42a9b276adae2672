"""What ``rayllm eval`` scores: a registry version (or a model folder), on which tasks, and how
its answers are generated."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from rayllm.config import StageConfig
from rayllm.errors import RayllmError
from rayllm.registry.store import Registry, Version, default_registry

Task = Literal["perplexity", "qa", "safety", "harness"]


class EvalConfig(StageConfig):
    """The evaluation suite: held-out perplexity on a shard set; question answering on
    held-out chat pairs (exact match, F1, BLEU, ROUGE-L), zero-shot, few-shot or with chain of
    thought; refusals on the safety set; the same questions through lm-evaluation-harness
    against a served app. A registry version's results are stored in its
    manifest, where ``rayllm registry promote`` reads them."""

    work_paths: ClassVar[dict[str, str]] = {"data": "data"}

    model: str | None = None
    """A registry reference (``name``, ``name:3``, ``name@production``) or a Hugging Face
    model folder (required)."""
    registry: str | None = None
    """Registry root, any fsspec URL; default: $RAYLLM_REGISTRY, else rayllm-work/registry."""
    tasks: list[Task] = ["perplexity"]
    data: str | None = None
    """perplexity: the shard set whose validation split is scored; default rayllm-work/data."""
    max_rows: int = Field(512, ge=1)
    """perplexity: validation sequences scored at most (the first ones, in shard order)."""
    batch_size: int = Field(16, ge=1)
    qa_data: str = "chat"
    """qa: conversations (as ``rayllm finetune`` reads them) whose held-out share is asked:
    each one's last assistant turn is the reference answer."""
    held_out: float = Field(0.05, gt=0, lt=0.5)
    """qa: the held-out share, split with ``seed`` as ``rayllm finetune`` splits (keep both at
    the fine-tune's values to ask only questions it never trained on)."""
    seed: int = 0
    shots: int = Field(0, ge=0, le=16)
    """qa: in-context demonstrations (from the training share) before each question."""
    chain_of_thought: bool = False
    """qa: ask for reasoning first, and score the final answer (after 'Answer:')."""
    max_examples: int = Field(100, ge=1)
    """qa: questions asked at most (safety asks its whole set, 24 prompts)."""
    max_tokens: int = Field(48, ge=1)
    """Tokens generated per answer (greedy)."""
    endpoint: str | None = None
    """A served app's URL (``http://host:8000``): answers are requested from it (API key:
    $RAYLLM_API_KEY) instead of generated in Ray tasks."""
    served_model: str | None = None
    """The name the endpoint serves the version under; default: the model's name, or
    ``base:adapter:N`` for an adapter."""
    concurrency: int = Field(8, ge=1)
    """Requests in flight to the endpoint."""
    workers: int = Field(2, ge=1)
    """Ray tasks generating answers when there is no endpoint."""
    record: bool = True
    """Store the results in the registry version's manifest (``evaluations``)."""

    def model_folder(self) -> tuple[Path, str]:
        """A local folder of the model, and the name the report gives it (a registry version
        is verified and cached on this node first)."""
        if Path(self.required_model()).is_dir():
            return Path(self.required_model()), self.required_model()
        version, folder = self.store().local_path(self.required_model())
        return folder, version.ref

    def required_model(self) -> str:
        if self.model is None:
            raise RayllmError(
                "eval.model is required: a registry reference such as shakespeare@production, "
                "or a model folder"
            )
        return self.model

    def version(self) -> Version | None:
        """The registry version scored, pinned; None for a model folder."""
        if Path(self.required_model()).is_dir():
            return None
        return self.store().resolve(self.required_model())

    def store(self) -> Registry:
        return Registry(self.registry or default_registry())

    def result_key(self, task: str) -> str:
        """Where a task's results go in the manifest: ``qa``, ``qa-3shot``, ``qa-cot``, ..."""
        if task != "qa":
            return task
        return task + f"-{self.shots}shot" * bool(self.shots) + "-cot" * self.chain_of_thought
