"""Serving: a registry version behind Ray Serve's OpenAI routes, on vLLM, with autoscaling.

The registry reference is resolved to a verified local copy, then handed to
``ray.serve.llm`` as the model source; rayllm adds only the resolution and CPU-aware defaults.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import model_validator
from ray import serve

from rayllm.config import StageConfig
from rayllm.progress import Stage
from rayllm.registry.store import Registry


class ServeConfig(StageConfig):
    model: str = "shakespeare"
    """Registry reference: ``name``, ``name:3`` or ``name@production``."""
    app_name: str = "rayllm"
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
        return self


def llm_config(config: ServeConfig, registry: Registry):
    """The ``ray.serve.llm.LLMConfig`` for the registry version ``config.model`` names."""
    from ray.serve.llm import LLMConfig

    version, path = registry.local_path(config.model)
    engine = {"max_num_seqs": config.max_num_seqs, "enforce_eager": True}
    if config.max_model_len:
        engine["max_model_len"] = config.max_model_len
    if not config.gpus_per_replica:
        engine["dtype"] = "bfloat16" if _cpu_has_bf16() else "float32"
    engine |= config.engine_kwargs
    bundle = {"CPU": config.cpus_per_replica} | (
        {"GPU": config.gpus_per_replica} if config.gpus_per_replica else {}
    )
    return version, LLMConfig(
        model_loading_config={"model_id": version.name, "model_source": str(path)},
        engine_kwargs=engine,
        placement_group_config={"bundles": [bundle]},
        deployment_config={
            "autoscaling_config": {
                "min_replicas": config.min_replicas,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            },
        },
        runtime_env={
            "env_vars": {
                "VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib),
                "VLLM_LOGGING_LEVEL": config.log_level,
            }
        },
    )


def _cpu_has_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def deploy(config: ServeConfig, registry: Registry) -> dict[str, Any]:
    """Start (or update) the OpenAI app; returns the endpoint and the served version."""
    from ray.serve.llm import build_openai_app

    with Stage("serve: vLLM behind Ray Serve") as stage:
        version, llm = llm_config(config, registry)
        serve.start(
            http_options={"host": config.host, "port": config.port},
            logging_config={"log_level": config.log_level},
        )
        app = build_openai_app(
            {
                "llm_configs": [llm],
                "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}},
            }
        )
        serve.run(
            app,
            name=config.app_name,
            route_prefix="/",
            logging_config={"log_level": config.log_level},
        )
        url = f"http://{config.host}:{config.port}"
        stage.note(
            f"{version.ref} at {url}/v1 ({config.min_replicas}-{config.max_replicas} replicas)"
        )
    return {"url": url, "model": version.name, "version": version.version}


def shutdown(config: ServeConfig) -> None:
    serve.delete(config.app_name)
