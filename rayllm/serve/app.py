"""Serving: a registry version behind Ray Serve's OpenAI routes, on vLLM, with autoscaling.

The driver pins the reference to one version (``name@production`` -> ``name:3``) so that every
replica serves the same weights; each replica then resolves that version on its own node
(``rayllm.serve.replica_source``), so any node can serve from any registry root. rayllm adds
only that resolution and CPU-aware defaults to ``ray.serve.llm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray import serve

from rayllm.errors import RayllmError
from rayllm.progress import Stage
from rayllm.registry.store import Registry, Version
from rayllm.serve.config import ServeConfig


@dataclass(frozen=True)
class Endpoint:
    """What ``deploy`` started: where to send requests, and which version answers."""

    url: str
    """Base URL; the OpenAI routes are under ``{url}/v1``."""
    model: str
    """The model id requests name."""
    version: str
    """The pinned registry version, ``name:N``."""
    registry: str
    app_name: str


def pin_version(config: ServeConfig, registry: Registry) -> Version:
    """The one version every replica will serve (aliases and ``latest`` resolved now)."""
    if config.model is not None:
        return registry.resolve(config.model)
    models = registry.models()
    if len(models) != 1:
        known = ", ".join(models) or "none yet"
        raise RayllmError(
            f"serve.model is not set and the registry at {registry.url} holds {len(models)} "
            f"models ({known}); set model=NAME, NAME:VERSION or NAME@ALIAS"
        )
    return registry.resolve(models[0])


def llm_config(config: ServeConfig, version: Version, registry: Registry):
    """The ``ray.serve.llm.LLMConfig`` serving ``version``, resolved by each replica."""
    from ray.serve.llm import LLMConfig

    from rayllm.serve.replica_source import RegistrySource

    engine = {"max_num_seqs": config.max_num_seqs, "enforce_eager": True}
    if config.max_model_len:
        engine["max_model_len"] = config.max_model_len
    if not config.gpus_per_replica:
        engine["dtype"] = "bfloat16" if cpu_has_bf16() else "float32"
    engine |= config.engine_kwargs
    bundle = {"CPU": config.cpus_per_replica} | (
        {"GPU": config.gpus_per_replica} if config.gpus_per_replica else {}
    )
    return LLMConfig(
        model_loading_config={"model_id": version.name, "model_source": version.ref},
        engine_kwargs=engine,
        callback_config={
            "callback_class": RegistrySource,
            "callback_kwargs": {"root": registry.url, "ref": version.ref},
        },
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


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), from the kernel's
    CPU flags; elsewhere vLLM serves float32."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    flags = set(cpuinfo.read_text().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def deploy(config: ServeConfig) -> Endpoint:
    """Start (or update) the OpenAI app; returns the endpoint and the served version."""
    from ray.serve.llm import build_openai_app

    registry = Registry(config.registry_root())
    version = pin_version(config, registry)
    with Stage("serve: vLLM behind Ray Serve") as stage:
        serve.start(
            http_options={"host": config.host, "port": config.port},
            logging_config={"log_level": config.log_level},
        )
        app = build_openai_app(
            {
                "llm_configs": [llm_config(config, version, registry)],
                "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}},
            }
        )
        serve.run(
            app,
            name=config.app_name,
            route_prefix=config.route_prefix,
            logging_config={"log_level": config.log_level},
        )
        url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
        stage.note(
            f"{version.ref} at {url}/v1 ({config.min_replicas}-{config.max_replicas} replicas)"
        )
    return Endpoint(url, version.name, version.ref, registry.url, config.app_name)


def shutdown(config: ServeConfig) -> None:
    serve.delete(config.app_name)
