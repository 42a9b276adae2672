"""Autoscaling on what the vLLM engine reports (``rayllm.serve.engine_stats``), not only on
requests in flight, through Ray Serve's public hooks:

- each replica (``rayllm.serve.server.ModelServer``) reports its engine's load
  through Serve's ``record_autoscaling_stats``;
- ``EngineLoadPolicy``, a custom autoscaling policy run by the Serve controller, makes
  replicas follow the mean engine load against a target. Serve applies min/max_replicas and
  the up- and down-scaling delays around it.

The controller imports this module, as does every ``serve.status()`` call, so it imports
nothing of vLLM.
"""

from __future__ import annotations

import math
from typing import Any


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
