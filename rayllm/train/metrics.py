"""Throughput and model FLOPs utilisation, computed in one place for every step."""

from __future__ import annotations

import torch

# Dense bf16 peak TFLOP/s per device, for MFU when the config gives none.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def step_metrics(
    *, tokens: int, seconds: float, flops_per_token: float, workers: int, peak: float | None
) -> dict[str, float]:
    """tokens/s over all workers, achieved TFLOP/s per worker, and MFU when the peak is known."""
    tokens_per_s = tokens / seconds
    tflops = tokens_per_s * flops_per_token / workers / 1e12
    metrics = {"tokens_per_s": tokens_per_s, "tflops_per_worker": tflops}
    if peak:
        metrics["mfu"] = tflops / peak
    return metrics
