"""Autoscaling on what the vLLM engine reports (``rayllm.serve.engine_stats``), not only on
requests in flight, through Ray Serve's public hooks:

- ``LoadReportingServer``: ``ray.serve.llm``'s ``LLMServer`` with Serve's
  ``record_autoscaling_stats``: each replica reports its engine's load;
- ``EngineLoadPolicy``: a custom autoscaling policy (``AutoscalingPolicy``) run by the Serve
  controller: replicas follow the mean engine load against a target. Serve applies
  min/max_replicas and the up- and down-scaling delays around it.
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.llm import LLMServer

from rayllm.serve.engine_stats import engine_load


class LoadReportingServer(LLMServer):
    """A ``ray.serve.llm`` replica that tells Serve's autoscaler how full its engine is."""

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"engine_load": engine_load()}


class EngineLoadPolicy:
    """Replicas = current x mean engine load / target: above the target Serve adds
    replicas, below it removes them. A replica whose requests are all done counts as idle,
    whatever its engine reported last."""

    def __init__(self, target_engine_load: float = 0.75):
        self.target = target_engine_load

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        if ctx.total_num_requests == 0:
            return 0, {}  # Serve keeps min_replicas
        loads = (ctx.aggregated_metrics or {}).get("engine_load", {})
        if not loads:
            return ctx.current_num_replicas, {}
        mean = sum(loads.values()) / len(loads)
        return math.ceil(ctx.current_num_replicas * mean / self.target), {"engine_load": mean}
