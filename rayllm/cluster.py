"""Connecting to Ray: the cluster ``RAY_ADDRESS`` names, or a local one started on the spot."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from rayllm.config import StageConfig
from rayllm.errors import RayllmError


class RayConfig(StageConfig):
    address: str | None = None
    """A running cluster (``ray://host:10001``, ``host:6379`` or ``auto``); default: $RAY_ADDRESS,
    else a local cluster started for this run."""
    num_cpus: int | None = None
    """Logical CPUs of a local cluster; default: twice the cores, at least 8, so the train
    workers, data tasks, Serve's ingress and the vLLM replicas all get scheduled."""
    temp_dir: str | None = None


def connect(config: RayConfig) -> None:
    """Initialise Ray once per process; a bad address is a user error, not a hang."""
    quiet_ray_consoles()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = config.address or os.environ.get("RAY_ADDRESS")
    options = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
            fix = (
                "set RAY_ADDRESS to its address"
                if address == "auto"
                else "fix RAY_ADDRESS, or unset it to run locally"
            )
            raise RayllmError(
                f"cannot reach the Ray cluster at {address!r} ({str(err).splitlines()[0]}); "
                f"start it with `ray start --head` or {fix}; a cluster with token "
                "authentication also needs RAY_AUTH_MODE=token and its token "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
            ) from None
        return
    cpus = config.num_cpus or max(8, 2 * (os.cpu_count() or 1))
    # "local": a new cluster even where `ray start` left one running on this machine, which
    # ray.init would join otherwise (and then refuse num_cpus)
    ray.init(address="local", num_cpus=cpus, _temp_dir=config.temp_dir, **options)


@contextmanager
def own_cluster(cpus: int, why: str) -> Iterator[None]:
    """A local Ray cluster of exactly ``cpus`` CPUs, for a benchmark that must know what it
    measures on; ``why`` tells a user with ``RAY_ADDRESS`` set why it will not join theirs."""
    refuse_shared_cluster(why)
    ray.shutdown()
    ray.init(num_cpus=cpus, logging_level="WARNING")
    quiet_ray_consoles()
    try:
        yield
    finally:
        ray.shutdown()


def refuse_shared_cluster(why: str) -> None:
    if os.environ.get("RAY_ADDRESS"):
        raise RayllmError(f"{why}; unset RAY_ADDRESS")


def task_result(ref: ray.ObjectRef):
    """``ray.get`` of a task that may refuse its input: a RayllmError it raised comes back as
    itself (one line for the CLI to print), not wrapped in the task's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, RayllmError):
            raise error.cause from None
        raise


def quiet_ray_consoles() -> None:
    """rayllm prints one progress line per stage: Ray's libraries print only warnings to the
    console. Ray Data's full log still goes to ray-data.log in the session folder (its file
    handler keeps its level; only the console handlers are raised)."""
    import ray.data  # noqa: F401  (configures the ray.data loggers on import)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(logging.WARNING)
    for name in ("ray.serve", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a dead address; ``ray.init`` itself would retry for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise RayllmError(
            f"cannot reach the Ray cluster at {address!r} ({err}); start it with "
            "`ray start --head`, fix RAY_ADDRESS, or unset it to run a local cluster"
        ) from None
