"""Adapter: each vLLM replica resolves its registry version, and its LoRA adapters, on its own
node.

``ray.serve.llm.LLMConfig.callback_config`` is public, but the callback base class it expects
lives in ``ray.llm._internal`` in Ray 2.60 (later releases export it as
``ray.serve.llm.callbacks.CallbackBase``). Adapters reach the engine through ``LLMServer``'s
``model_downloader`` argument, whose result type (``DiskMultiplexConfig``) and per-process
adapter ids are internal too. This module is the only place that imports them;
``tests/serve/test_replica_source.py`` pins the hooks rayllm relies on.

Before the engine starts, the replica turns the registry reference into a verified local copy
(``Registry.local_path``: in place on a shared local root, else downloaded once per node into
``$RAYLLM_CACHE/registry`` under a file lock that concurrent replicas share) and points the
engine at it. Ray's own Hugging Face download step is skipped: there is nothing left to fetch.
An adapter is fetched the same way when a request first names it on the replica.
"""

from __future__ import annotations

import asyncio

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.serve.llm import LLMConfig


class RegistrySource(CallbackBase):
    """``callback_kwargs``: ``root`` (registry URL) and ``ref`` (a pinned ``name:version``)."""

    async def on_before_node_init(self) -> None:
        from rayllm.registry.store import Registry

        root, ref = self.kwargs["root"], self.kwargs["ref"]
        _, folder = await asyncio.to_thread(Registry(root).local_path, ref)
        self.llm_config.get_engine_config().hf_model_id = str(folder)
        self.ctx.run_init_node = False


class RegistryAdapters:
    """``LLMServer``'s adapter loader: ``base_id:adapter:N`` (the name the ingress pinned the
    request to) -> a verified local copy of registry version ``adapter:N``. Serve's model
    multiplexing calls it once per adapter and replica, and evicts the least recently used."""

    def __init__(self, download_timeout_s: float | None = None, max_tries: int = 1):
        pass  # the registry verifies what it copies; a failed copy fails that request

    async def load_model_from_config(
        self, lora_model_id: str, llm_config: LLMConfig
    ) -> DiskMultiplexConfig:
        from rayllm.registry.store import Registry

        root = llm_config.callback_config.callback_kwargs["root"]
        adapter = lora_model_id.partition(":")[2]
        _, folder = await asyncio.to_thread(Registry(root).local_path, adapter)
        return DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=None,
            local_path=str(folder),
            lora_assigned_int_id=global_id_manager.next(),
        )
