"""The vLLM engine's own view of its load, kept in the process that runs it.

``EngineLoadLogger`` is a vLLM stat-logger plugin (entry point ``vllm.stat_logger_plugins`` in
rayllm's package metadata, so every engine in this environment loads it): each engine step
hands it the scheduler's figures, and it keeps the latest. It imports no Ray, so it costs a
plain vLLM process nothing but a few stores per step.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

_latest: dict[str, float] = {}
"""The latest scheduler figures of the engine in this process (one engine per replica)."""


class EngineLoadLogger(StatLoggerBase):
    """Keeps the scheduler's figures from each engine step; logs nothing."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is None:
            return
        sequences = scheduler_stats.num_running_reqs + scheduler_stats.num_waiting_reqs
        _latest.update(
            running=scheduler_stats.num_running_reqs,
            waiting=scheduler_stats.num_waiting_reqs,
            batch_use=sequences / self.max_num_seqs,
            kv_cache_use=scheduler_stats.kv_cache_usage,
        )

    def log_engine_initialized(self) -> None:
        pass


def engine_load() -> float:
    """How full the engine in this process is: the larger of its batch use, (running +
    waiting sequences) / max_num_seqs, above 1 when requests queue, and its KV-cache use,
    which fills first on long prompts. 0 before its first step."""
    return max(_latest.get("batch_use", 0.0), _latest.get("kv_cache_use", 0.0))
