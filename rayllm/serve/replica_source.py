"""Adapter: each vLLM replica resolves its registry version on its own node.

``ray.serve.llm.LLMConfig.callback_config`` is public, but the callback base class it expects
lives in ``ray.llm._internal`` in Ray 2.60 (later releases export it as
``ray.serve.llm.callbacks.CallbackBase``). This module is the only place that imports it;
``tests/serve/test_replica_source.py`` pins the hooks rayllm relies on.

Before the engine starts, the replica turns the registry reference into a verified local copy
(``Registry.local_path``: in place on a shared local root, else downloaded once per node into
``$RAYLLM_CACHE/registry`` under a file lock that concurrent replicas share) and points the
engine at it. Ray's own Hugging Face download step is skipped: there is nothing left to fetch.
"""

from __future__ import annotations

import asyncio

from ray.llm._internal.common.callbacks.base import CallbackBase


class RegistrySource(CallbackBase):
    """``callback_kwargs``: ``root`` (registry URL) and ``ref`` (a pinned ``name:version``)."""

    async def on_before_node_init(self) -> None:
        from rayllm.registry.store import Registry

        root, ref = self.kwargs["root"], self.kwargs["ref"]
        _, folder = await asyncio.to_thread(Registry(root).local_path, ref)
        self.llm_config.get_engine_config().hf_model_id = str(folder)
        self.ctx.run_init_node = False
