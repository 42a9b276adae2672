"""The model replica: ``ray.serve.llm``'s ``LLMServer`` (the vLLM engine behind Serve) that loads
LoRA adapters from the registry, tells Serve's autoscaler how full its engine is, for
``rayllm.serve.autoscaling.EngineLoadPolicy``, runs a one-rank CPU model without a worker
process, and, in an app with ``ingress: direct``, answers HTTP itself behind rayllm's checks."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm import LLMConfig, LLMServer

from rayllm.serve.app import CPU_THREAD_BINDING
from rayllm.serve.engine_stats import engine_load
from rayllm.serve.replica_source import RegistryAdapters


class ModelEngine(VLLMEngine):
    """``ray.serve.llm``'s vLLM engine, with a one-rank CPU model run inside vLLM's engine-core
    process (vLLM's one-process executor).

    ``ray.serve.llm`` always gives vLLM's CPU engine the multiprocess executor, which spawns a
    worker process per replica besides the engine core: a third process importing vLLM and
    torch at every replica start (a cold start from zero replicas waits for it), and one more
    process polling a shared-memory queue under load. One rank has nothing to spread, and
    vLLM runs it in process when asked (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` does the same for
    a plain vLLM). Adapter over Ray's private ``VLLMEngine._start_async_llm_engine``: the
    replica test checks the engine runs without a worker process.

    The ranks of a tensor-parallel CPU engine are bound to no cores unless the node's
    environment (``ray start``'s) sets ``VLLM_CPU_OMP_THREADS_BIND``: vLLM would bind each rank
    to all cores of a NUMA node of its own, where Ray reserved the replica a number of the
    node's CPUs, not cores, other replicas may compute beside it, and a host of one NUMA node
    has too few. A node started with ``VLLM_CPU_OMP_THREADS_BIND=auto`` that a replica has to
    itself binds one rank to each of its sockets, as vLLM does.

    It also loads a LoRA adapter once, however many of its first requests come at once. Ray's
    ``VLLMEngine.resolve_lora`` looks for the adapter among the loaded ones and loads it across
    an await: each request that looked before the first load ended loads it again, and vLLM
    answers those "has already been loaded", a 500 to their clients. Adapter over that private
    method: tests/serve/test_lora.py sends an adapter's first requests at once.
    """

    def __init__(self, llm_config: LLMConfig):
        super().__init__(llm_config)
        self._adapter_loading = asyncio.Lock()

    async def resolve_lora(self, disk_lora_model: Any) -> None:
        async with self._adapter_loading:  # the next request in finds the adapter loaded
            await super().resolve_lora(disk_lora_model)

    def _start_async_llm_engine(self, engine_args: Any, vllm_config: Any, placement_group: Any):
        parallel = vllm_config.parallel_config
        if vllm_config.device_config.device_type == "cpu":
            if parallel.world_size == 1:
                parallel.distributed_executor_backend = "uni"
            else:  # read by the executor it starts, which its rank processes inherit
                os.environ.setdefault(CPU_THREAD_BINDING, "nobind")
        return super()._start_async_llm_engine(engine_args, vllm_config, placement_group)


class ModelServer(LLMServer):
    """A ``ray.serve.llm`` replica whose adapters come from the registry and which reports its
    engine's load with its autoscaling stats.

    Served with ``ingress: direct`` it is the app's ingress (``rayllm.serve.ingress.direct_app``)
    and gets the key digests and the pinned ServeConfig the app was built from; otherwise
    rayllm's ingress holds them."""

    async def __init__(
        self,
        llm_config: LLMConfig,
        key_digests: list[str] | None = None,
        serve_config: dict[str, Any] | None = None,
    ):
        await super().__init__(
            llm_config, engine_cls=ModelEngine, model_downloader=RegistryAdapters
        )
        self._key_digests, self._serve_config = key_digests or [], serve_config
        loading = llm_config.model_loading_config
        self._versions = {loading.model_id: loading.model_source}  # the pinned `name:N`

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"engine_load": engine_load()}

    async def serve_config(self) -> dict[str, Any] | None:
        """The pinned ServeConfig of a direct-ingress app, for ``rayllm serve rollout`` and
        ``rayllm serve status``."""
        return self._serve_config

    async def __serve_build_asgi_app__(self):
        """Direct ingress: vLLM's own OpenAI app (as ``ray.serve.llm`` builds it), behind the
        same API-key, JSON-body and chat-role checks as rayllm's ingress, its model listing
        naming the registry version."""
        from rayllm.serve.ingress import (
            KnownChatRolesOnly,
            RegistryVersionsInModels,
            add_request_checks,
        )

        app = await super().__serve_build_asgi_app__()
        app.middleware_stack = None  # vLLM built its stack; Starlette rebuilds it with these
        app.add_middleware(RegistryVersionsInModels, versions=self._versions)
        app.add_middleware(KnownChatRolesOnly)  # runs after the key and JSON checks
        add_request_checks(app, self._key_digests)
        return app
