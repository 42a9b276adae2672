"""An async load generator for OpenAI completion endpoints, in the shape of vLLM's
``benchmark_serving``: a closed loop at fixed concurrency or an open loop with Poisson
arrivals, every request streamed, and the latencies users feel (TTFT, TPOT, inter-token
latency, end to end) summarised as mean and percentiles.

Every request asks for exactly ``output_tokens`` tokens (``ignore_eos``, a vLLM sampling
parameter), so systems that stop at different places still do the same work.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class Load:
    """What to send: ``concurrency`` requests in flight at all times (closed loop), or
    arrivals at ``rate`` per second, Poisson (open loop)."""

    requests: int
    output_tokens: int
    concurrency: int | None = None
    rate: float | None = None
    seed: int = 0

    def __post_init__(self):
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give a Load either concurrency (closed loop) or rate (open loop)")

    @property
    def name(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        return f"Poisson {self.rate:g} req/s"


@dataclass
class RequestTiming:
    started: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    finished: float = 0.0
    error: str | None = None


async def _one_request(
    client: httpx.AsyncClient, model: str, prompt: str, load: Load
) -> RequestTiming:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": load.output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timing = RequestTiming(started=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                timing.error = f"{response.status_code}: {response.text[:200]}"
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    timing.output_tokens = chunk["usage"]["completion_tokens"]
                if any(choice.get("text") for choice in chunk.get("choices", [])):
                    timing.chunk_times.append(time.perf_counter())
    except httpx.HTTPError as error:
        timing.error = f"{type(error).__name__}: {error}"
    timing.finished = time.perf_counter()
    if timing.error is None and not timing.chunk_times:
        timing.error = "the stream carried no text"
    return timing


async def run_load(
    url: str, model: str, prompts: list[str], load: Load, api_key: str | None = None
) -> dict[str, Any]:
    """Send ``load.requests`` streamed completions to ``{url}/v1/completions``, cycling
    through ``prompts``; returns the summary of ``summarise``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(600.0)
    chosen = [prompts[n % len(prompts)] for n in range(load.requests)]
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        started = time.perf_counter()
        if load.concurrency is not None:
            timings = await _closed_loop(client, model, chosen, load)
        else:
            timings = await _open_loop(client, model, chosen, load)
        duration = time.perf_counter() - started
    return summarise(timings, duration)


async def _closed_loop(client, model, prompts: list[str], load: Load) -> list[RequestTiming]:
    queue = list(reversed(prompts))
    timings: list[RequestTiming] = []

    async def user() -> None:
        while queue:
            timings.append(await _one_request(client, model, queue.pop(), load))

    await asyncio.gather(*(user() for _ in range(load.concurrency or 1)))
    return timings


async def _open_loop(client, model, prompts: list[str], load: Load) -> list[RequestTiming]:
    gaps = random.Random(load.seed)
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(_one_request(client, model, prompt, load)))
        await asyncio.sleep(gaps.expovariate(load.rate or 1.0))
    return list(await asyncio.gather(*tasks))


def summarise(timings: list[RequestTiming], duration_s: float) -> dict[str, Any]:
    """Throughput over the whole window and latency distributions, in milliseconds: TTFT
    (request sent to first text), TPOT (the rest of the request per further token), ITL
    (between streamed chunks) and end to end."""
    done = [t for t in timings if t.error is None]
    ttft = [t.chunk_times[0] - t.started for t in done]
    tpot = [
        (t.finished - t.chunk_times[0]) / (t.output_tokens - 1) for t in done if t.output_tokens > 1
    ]
    itl = [b - a for t in done for a, b in zip(t.chunk_times, t.chunk_times[1:], strict=False)]
    e2e = [t.finished - t.started for t in done]
    output_tokens = sum(t.output_tokens for t in done)
    summary: dict[str, Any] = {
        "requests": len(timings),
        "failed": len(timings) - len(done),
        "errors": sorted({t.error for t in timings if t.error})[:5],
        "duration_s": duration_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration_s,
        "requests_per_s": len(done) / duration_s,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        summary |= distribution(name, values)
    return summary


def distribution(name: str, seconds: list[float]) -> dict[str, float]:
    """Mean, p50, p90 and p99 of ``seconds``, in milliseconds, as ``{name}_p50_ms`` etc."""
    if not seconds:
        return {}
    ms = sorted(value * 1000 for value in seconds)
    quantiles = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {
        f"{name}_mean_ms": statistics.fmean(ms),
        f"{name}_p50_ms": quantiles[49],
        f"{name}_p90_ms": quantiles[89],
        f"{name}_p99_ms": quantiles[98],
    }
