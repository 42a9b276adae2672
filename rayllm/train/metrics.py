"""Throughput, model FLOPs utilisation and memory, computed in one place for every step, and
the run's metrics log (one JSON line per logged step)."""

from __future__ import annotations

import json
import resource
import time

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from rayllm.paths import filesystem


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Dense matmul TFLOP/s this worker reaches on its own device: the peak MFU is taken
    against, measured at start so it reflects the threads and hardware the run really has.
    It runs ``F.linear``, the kernel the model's layers run: on CPUs without native bf16 a
    bf16 ``torch.matmul`` takes a path ten times slower than bf16 ``linear``."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    F.linear(a, b)  # warm-up
    synchronize(device)
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or count < 3:
        F.linear(a, b)
        count += 1
        synchronize(device)
    return 2 * size**3 * count / elapsed / 1e12


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this rank has held: GPU memory allocated, or on CPU the process's
    peak resident set (which also counts the Python runtime and libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def held_bytes(tensors) -> int:
    """Bytes of the storage behind ``tensors`` on this rank, each storage counted once (views
    into one flat buffer are one buffer); a DTensor counts its local shard."""
    storages = {}
    pending = list(tensors)
    while pending:
        tensor = pending.pop()
        if tensor is None:
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        if hasattr(tensor, "__tensor_flatten__"):  # a wrapper (QLoRA's NF4): its parts
            names, _ = tensor.__tensor_flatten__()
            pending += [getattr(tensor, name) for name in names]
            continue
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def optimizer_state_bytes(optimizers) -> int:
    """Bytes of the per-parameter optimizer state (Adam's moments; scalar step counts aside)."""
    return held_bytes(
        value
        for optimizer in optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )


def step_metrics(
    *, tokens: int, seconds: float, flops_per_token: float, workers: int, peak: float
) -> dict[str, float]:
    """tokens/s over all workers and per worker, achieved TFLOP/s per worker, and MFU, of
    ``tokens`` trained in ``seconds``."""
    tokens_per_s = tokens / seconds
    tflops = tokens_per_s * flops_per_token / workers / 1e12
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_worker": tokens_per_s / workers,
        "tflops_per_worker": tflops,
        "mfu": tflops / peak,
    }


METRICS_LOG = "metrics.jsonl"


class MetricsLog:
    """``metrics.jsonl`` in the run folder (any fsspec URL), rewritten whole at each logged
    step since object stores cannot append; a resumed run keeps the lines before its start."""

    def __init__(self, url: str, start_step: int):
        self.fs, self.path = filesystem(url)
        self.lines: list[str] = []
        if start_step and self.fs.exists(self.path):
            text = self.fs.cat_file(self.path).decode()
            self.lines = [
                line for line in text.splitlines() if json.loads(line)["step"] <= start_step
            ]

    def write(self, metrics: dict) -> None:
        self.lines.append(json.dumps(metrics))
        self.fs.pipe_file(self.path, ("\n".join(self.lines) + "\n").encode())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
