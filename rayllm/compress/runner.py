"""``rayllm compress``: a registry version in, a compressed version out, in one Ray task
(``rayllm.compress.task``) that reads the source from the registry and publishes the result
(distillation trains on Ray Train instead: ``rayllm.compress.distill``; so does a recovery
with workers: ``rayllm.compress.recovery_on_ray_train``). This module is what the command line
imports: it starts in a second, the task's torch and transformers are the worker's to import."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from rayllm.cluster import task_result
from rayllm.compress.config import CompressConfig


@dataclass(frozen=True)
class CompressResult:
    version: str
    bytes_before: int
    bytes_after: int
    loss_before: float
    loss_after: float
    seconds: float


def run(config: CompressConfig) -> CompressResult:
    """Compress ``config.source`` in a Ray task (``config.cpus`` CPUs), or distill it on Ray
    Train, and publish the result."""
    config = config.with_work_paths()
    version = config.check_inputs()
    # The task runs with the cluster's environment: it gets the version pinned, the root named.
    config = config.model_copy(update={"source": version.ref, "registry": config.store().url})
    if config.method == "distill":
        from rayllm.compress.distill import distill_version

        return CompressResult(**distill_version(config))
    if config.recovery.on_ray_train():
        from rayllm.compress.recovery_on_ray_train import compress_then_train

        return CompressResult(**compress_then_train(config))
    task = ray.remote(num_cpus=config.cpus)(compress_task)
    return CompressResult(**task_result(task.remote(config)))


def compress_task(config: CompressConfig, stage_to: str | None = None) -> dict:
    """The Ray task's entry point, which imports the compression code on the worker."""
    from rayllm.compress.task import compress_version

    return compress_version(config, stage_to)
