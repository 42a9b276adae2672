"""The model replica: ``ray.serve.llm``'s ``LLMServer`` (the vLLM engine behind Serve) telling
Serve's autoscaler how full its engine is, for ``rayllm.serve.autoscaling.EngineLoadPolicy``."""

from __future__ import annotations

from ray.serve.llm import LLMServer

from rayllm.serve.engine_stats import engine_load


class LoadReportingServer(LLMServer):
    """A ``ray.serve.llm`` replica that reports its engine's load with its autoscaling stats."""

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"engine_load": engine_load()}
