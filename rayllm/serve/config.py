"""What ``rayllm serve`` deploys: the registry reference, the routes, replicas and engine
settings. Nothing here imports Ray, so the CLI checks a config before anything starts."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from rayllm.config import StageConfig
from rayllm.registry.store import default_registry


class ServeConfig(StageConfig):
    model: str | None = None
    """Registry reference: ``name``, ``name:3`` or ``name@production``; default: the only
    model in the registry (in the lifecycle: the version it just published)."""
    registry: str | None = None
    """Registry root, any fsspec URL; default: $RAYLLM_REGISTRY, else rayllm-work/registry
    (in the lifecycle: the root it publishes to)."""
    app_name: str = "rayllm"
    route_prefix: str = "/"
    """Where the OpenAI routes live: ``/`` gives ``/v1/...``, ``/a`` gives ``/a/v1/...``."""
    host: str = "127.0.0.1"
    port: int = 8000
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 8
    """Autoscaling target: requests in flight per replica before Serve adds one."""
    cpus_per_replica: float = 1.0
    gpus_per_replica: int = 0
    max_model_len: int | None = None
    """Context length; defaults to the model's max_position_embeddings."""
    kv_cache_gib: int = 1
    """KV-cache size per replica on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    max_num_seqs: int = 16
    engine_kwargs: dict[str, Any] = {}
    """Any other vLLM engine argument, passed through unchanged."""
    log_level: str = "WARNING"
    """Log level of Serve replicas and the vLLM engine (INFO shows every request)."""

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if not 0 < self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 < min_replicas <= max_replicas")
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return self

    def registry_root(self) -> str:
        return self.registry or default_registry()
