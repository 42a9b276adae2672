"""What ``rayllm eval`` scores: a model, and the shard set whose held-out split it is scored on."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from rayllm.config import StageConfig
from rayllm.errors import RayllmError
from rayllm.registry.store import Registry, default_registry


class EvalConfig(StageConfig):
    """Held-out perplexity of a registry version (or a model folder) on a shard set."""

    work_paths: ClassVar[dict[str, str]] = {"data": "data"}

    model: str | None = None
    """A registry reference (``name``, ``name:3``, ``name@production``) or a Hugging Face
    model folder (required)."""
    registry: str | None = None
    """Registry root, any fsspec URL; default: $RAYLLM_REGISTRY, else rayllm-work/registry."""
    data: str | None = None
    """The shard set whose validation split is scored; default rayllm-work/data."""
    max_rows: int = Field(512, ge=1)
    """Validation sequences scored at most (the first ones, in shard order)."""
    batch_size: int = Field(16, ge=1)

    def model_folder(self) -> tuple[Path, str]:
        """A local folder of the model, and the name the report gives it (a registry version
        is verified and cached on this node first)."""
        if self.model is None:
            raise RayllmError(
                "eval.model is required: a registry reference such as shakespeare@production, "
                "or a model folder"
            )
        if Path(self.model).is_dir():
            return Path(self.model), self.model
        version, folder = Registry(self.registry or default_registry()).local_path(self.model)
        return folder, version.ref
