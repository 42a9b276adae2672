"""The model replica: ``ray.serve.llm``'s ``LLMServer`` (the vLLM engine behind Serve) that loads
LoRA adapters from the registry and tells Serve's autoscaler how full its engine is, for
``rayllm.serve.autoscaling.EngineLoadPolicy``."""

from __future__ import annotations

from ray.serve.llm import LLMConfig, LLMServer

from rayllm.serve.engine_stats import engine_load
from rayllm.serve.replica_source import RegistryAdapters


class ModelServer(LLMServer):
    """A ``ray.serve.llm`` replica whose adapters come from the registry and which reports its
    engine's load with its autoscaling stats."""

    async def __init__(self, llm_config: LLMConfig):
        await super().__init__(llm_config, model_downloader=RegistryAdapters)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"engine_load": engine_load()}
