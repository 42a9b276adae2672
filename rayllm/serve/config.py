"""What ``rayllm serve`` deploys (registry references, routes, API keys, and each model's
replicas and engine settings) and what ``rayllm batch`` runs. Nothing here imports Ray, so
the CLI checks a config before anything starts."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import model_validator

from rayllm.config import StageConfig
from rayllm.errors import RayllmError
from rayllm.registry.store import default_registry


class EngineSettings(StageConfig):
    """The vLLM engine one model runs on: placement, context, memory, batch, adapters."""

    use_gpu: bool | None = None
    """Run on GPUs (one per tensor-parallel rank) or on the CPU engine; default: GPUs where
    the cluster has them."""
    tensor_parallel_size: int = 1
    """Shards one replica's weights over that many ranks: GPUs, or on CPUs processes of the
    replica's node, each with its own bundle of cpus_per_replica CPUs (a multi-socket host
    computes a model over its sockets so). Serving only: batch inference runs a CPU engine
    as one rank."""
    max_model_len: int | None = None
    """Context length; defaults to the model's max_position_embeddings."""
    dtype: str = "auto"
    """Weights' and activations' dtype; auto: bfloat16 on GPUs and where every node that can
    host a CPU replica computes it natively (read on those nodes), else float32."""
    kv_cache_gib: float = 1.0
    """KV-cache size per replica on CPU, in GiB (vLLM's kv_cache_memory_bytes, per rank: a
    tensor-parallel replica's ranks split it): the tokens of all running sequences must fit,
    or the engine queues and preempts; on GPUs vLLM sizes it from gpu_memory_utilization (an
    engine_kwargs entry)."""
    prefix_caching: bool = True
    """Reuse the KV blocks of a prompt prefix seen before (vLLM's automatic prefix caching):
    prompts sharing a system prompt or a few-shot header skip its prefill."""
    kv_offload_gib: float = 0.0
    """GPU replicas: a CPU-memory buffer the KV cache spills to (vLLM's native KV offloading),
    so more sequences and longer prefixes stay cached than GPU memory holds; 0: none."""
    weight_offload_gib: float = 0.0
    """GPU replicas: GiB of weights kept in CPU memory and streamed in each step (vLLM's
    cpu_offload_gb), for a model larger than GPU memory, at a large cost in speed; 0: none."""
    max_num_seqs: int = 16
    """Sequences one replica runs at once (continuous batching's batch size)."""
    max_loras: int = 0
    """LoRA adapters of this model (registry versions published against the served version)
    one replica holds at once, loaded on first request and evicted least recently used;
    0 serves no adapters. Requests name one as ``model_id:adapter`` (or ``:adapter:3``,
    ``:adapter@production``)."""
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256] = 16
    """The highest adapter rank the replicas accept (vLLM reserves memory for it)."""
    engine_kwargs: dict[str, Any] = {}
    """Any other vLLM engine argument, passed through unchanged."""

    @model_validator(mode="after")
    def _check_engine(self) -> EngineSettings:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.kv_cache_gib <= 0 or self.kv_offload_gib < 0 or self.weight_offload_gib < 0:
            raise ValueError(
                "kv_cache_gib must be above 0; kv_offload_gib, weight_offload_gib 0 or more"
            )
        if self.max_loras < 0:
            raise ValueError("max_loras must be 0 (no adapters) or more")
        return self


class ReplicaSettings(EngineSettings):
    """How one model is served: its replicas, their resources, and the vLLM engine."""

    min_replicas: int = 1
    """0 lets an idle model scale to zero (after downscale_delay_s); its next request then
    waits for a replica to start (a vLLM engine: about a minute on CPU)."""
    max_replicas: int = 2
    target_ongoing_requests: int = 8
    """Autoscaling target when ``autoscale_on`` is requests: requests in flight per replica."""
    autoscale_on: Literal["engine_load", "requests"] = "engine_load"
    """What replicas follow: the engine's load (its batch and KV-cache use, which vLLM
    reports every step) or Serve's count of requests in flight."""
    target_engine_load: float = 0.75
    """Autoscaling target on engine load: the fraction of max_num_seqs (or of the KV cache)
    each replica should be using; above it Serve adds replicas, below it removes them."""
    upscale_delay_s: float = 30.0
    """How long the load must stay above the target before a replica is added."""
    downscale_delay_s: float = 600.0
    """How long the load must stay below the target before a replica is removed."""
    look_back_period_s: float = 30.0
    """The window of reported load each decision averages, in seconds: shorter follows a
    burst's start and end sooner, longer rides out brief spikes. Serve needs it above its
    10 s metrics interval."""
    max_surge_percent: int = 100
    """Replicas a rollout may start beyond the model's current count, in percent of it: at
    100 every old replica serves until its replacement is ready (the cluster needs room for
    them); 0 stops old replicas first (Serve's default), and a model with one replica then
    stops answering until the new one has started."""
    cpus_per_replica: float = 1.0
    """CPUs Ray reserves for each replica (each tensor-parallel rank), its front end included;
    a CPU engine computes with a thread on each whole CPU but one (at least one)."""
    replica_resources: dict[str, float] = {}
    """Custom Ray resources each replica (each tensor-parallel rank) asks for as well, e.g.
    ``{serving: 1}``: replicas then run only on the nodes started with them (``ray start
    --resources``), as many on each as its amount allows."""
    stream_batching_ms: float = 0
    """How long a replica gathers streamed tokens before sending them on as one message;
    0 sends every token at once."""

    @model_validator(mode="after")
    def _check_replicas(self) -> ReplicaSettings:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.look_back_period_s <= 10:
            raise ValueError(
                "look_back_period_s must be above 10 (Serve's metrics interval, in seconds)"
            )
        if not 0 < self.target_engine_load <= 1:
            raise ValueError("target_engine_load is a fraction: 0 < target_engine_load <= 1")
        if self.stream_batching_ms < 0:
            raise ValueError("stream_batching_ms must be 0 (no batching) or more")
        if self.cpus_per_replica <= 0:
            raise ValueError(
                "cpus_per_replica must be above 0: the CPUs each replica takes, its front end "
                "included"
            )
        if any(
            name in ("CPU", "GPU", "memory") or amount <= 0
            for name, amount in self.replica_resources.items()
        ):
            raise ValueError(
                "replica_resources names custom resources with positive amounts; CPUs are "
                "cpus_per_replica, GPUs use_gpu"
            )
        if not 0 <= self.max_surge_percent <= 100:
            raise ValueError("max_surge_percent is a percentage: 0 <= max_surge_percent <= 100")
        return self

    def replica_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ReplicaSettings.model_fields}


class BatchConfig(EngineSettings):
    """Batch inference: every prompt of a dataset through one registry version's vLLM engine
    on Ray Data (``ray.data.llm``), completions written to Parquet."""

    model: str | None = None
    """Registry reference: ``name``, ``name:3`` or ``name@production`` (required)."""
    registry: str | None = None
    """Registry root, any fsspec URL; default: $RAYLLM_REGISTRY, else rayllm-work/registry."""
    input: str | None = None
    """JSON lines (``.jsonl``) or Parquet files, a path, folder or URL; each row has a
    ``prompt`` (text to complete) or ``messages`` (a chat, through the model's template)
    (required)."""
    output: str = "rayllm-work/batch"
    """A folder (path or URL): ``completions/`` holds the Parquet files, each input row with
    its ``completion``, token counts and the registry version that wrote it."""
    overwrite: bool = False
    max_tokens: int = 64
    temperature: float = 0.0
    batch_size: int = 16
    """Rows sent to an engine at once."""
    engines: int = 1
    """Engine workers running at once (data parallel)."""
    cpus_per_engine: float = 1.0

    @model_validator(mode="after")
    def _check_engines(self) -> BatchConfig:
        if self.engines < 1 or self.cpus_per_engine <= 0:
            raise ValueError("need engines >= 1 and cpus_per_engine above 0")
        return self

    def registry_root(self) -> str:
        return self.registry or default_registry()

    def check_given(self) -> None:
        for key in ("model", "input"):
            if getattr(self, key) is None:
                raise RayllmError(f"batch.{key} is not set; give it with --set {key}=...")


class ModelEntry(ReplicaSettings):
    """One model of the app; settings it does not give come from the app's own."""

    model: str
    """Registry reference: ``name``, ``name:3`` or ``name@production``."""
    model_id: str | None = None
    """The id requests name; default: the registry name."""
    version: str | None = None
    """The version ``model`` named when the app was built, ``name:N``; rayllm sets it, and a
    Serve config file carries it, so that every replica (and the app rebuilt after a restart)
    serves that version until ``rayllm serve rollout`` resolves ``model`` again."""


class ServeConfig(ReplicaSettings):
    """One OpenAI app. Its replica settings are every model's defaults; ``models`` lists the
    models with their own overrides, or ``model`` names the only one."""

    model: str | None = None
    """Registry reference of a single served model: ``name``, ``name:3`` or
    ``name@production``; default: the only model in the registry (in the lifecycle: the
    version it just published)."""
    models: list[str | ModelEntry] = []
    """Several models in one app, each a reference or a ModelEntry with its own settings."""
    registry: str | None = None
    """Registry root, any fsspec URL; default: $RAYLLM_REGISTRY, else rayllm-work/registry
    (in the lifecycle: the root it publishes to)."""
    app_name: str = "rayllm"
    route_prefix: str = "/"
    """Where the OpenAI routes live: ``/`` gives ``/v1/...``, ``/a`` gives ``/a/v1/...``."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: str | None = None
    """A file of API keys, one per line; requests must send one as ``Authorization: Bearer``.
    Read where the app is built; only the keys' SHA-256 digests reach the replicas."""
    api_keys_env: str | None = None
    """The name of an environment variable holding comma-separated API keys (e.g. from a
    Kubernetes Secret); combined with ``api_keys_file`` when both are set."""
    api_key_digests: list[str] | None = None
    """The SHA-256 digests (hex) of the keys the app was built with; rayllm sets it in the
    config the running app holds, so that ``rayllm serve rollout``, wherever it runs, keeps
    the app's keys without reading them again. Keys change with a new ``rayllm serve``."""
    log_level: str = "WARNING"
    """Log level of Serve replicas and the vLLM engine (INFO shows every request)."""
    ingress: Literal["app", "direct"] = "app"
    """How requests reach the replicas. ``app``: through rayllm's OpenAI ingress deployment
    (several models, LoRA adapters, adapter versions in /v1/models, 503 for a lost replica).
    ``direct``: the app's one model answers HTTP in its replicas with vLLM's own OpenAI
    server, and Serve's HAProxy sends each request straight to a replica (one hop instead of
    three); needs a cluster in Serve's HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1`` where Ray
    and the app are started) and serves no adapters."""

    @model_validator(mode="after")
    def _check_app(self) -> ServeConfig:
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        if not all(re.fullmatch("[0-9a-f]{64}", d) for d in self.api_key_digests or ()):
            raise ValueError("api_key_digests are SHA-256 digests: 64 lowercase hex digits each")
        if self.model is not None and self.models:
            raise ValueError("set either model (one model) or models (several), not both")
        if self.ingress == "direct" and len(self.models) > 1:
            raise ValueError(
                "ingress=direct serves one model (its replicas are the ingress); serve "
                "several models with ingress=app, or deploy one app per model"
            )
        if self.ingress == "direct" and any(entry.max_loras for entry in self.entries()):
            raise ValueError(
                "ingress=direct serves no LoRA adapters (rayllm's ingress pins them to "
                "registry versions); set max_loras=0 or ingress=app"
            )
        return self

    def registry_root(self) -> str:
        return self.registry or default_registry()

    def entries(self) -> list[ModelEntry]:
        """Each served model with its settings: the entry's own, else the app's."""
        listed = self.models or ([self.model] if self.model is not None else [])
        entries = []
        for item in listed:
            given = ModelEntry(model=item) if isinstance(item, str) else item
            own = given.model_dump(include=given.model_fields_set)
            entries.append(ModelEntry.model_validate(self.replica_settings() | own))
        return entries
