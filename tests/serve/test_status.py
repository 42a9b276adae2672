"""What the served app reports: Ray's Prometheus metrics for Serve and the vLLM engine, and
``rayllm serve status`` over them, on the session's served model."""

import json
import subprocess
import sys
import time

import httpx
import pytest

from rayllm.client import Client
from rayllm.serve.status import GENERATED, OUTPUT_TOKEN_TIME, REQUESTS, TTFT
from tests.test_readme import block_with, commands

pytestmark = pytest.mark.slow

MODEL = "tiny-shakespeare"
METRICS = {
    "requests": REQUESTS,
    "errors by code": "ray_serve_num_http_error_requests_total",
    "request latency": "ray_serve_http_request_latency_ms_bucket",
    "time to first token": f"{TTFT}_bucket",
    "time per output token": f"{OUTPUT_TOKEN_TIME}_bucket",
    "queue length": "ray_serve_deployment_queued_queries",
    "generated tokens": GENERATED,
    "healthy replicas": "ray_serve_deployment_replica_healthy",
}
"""What the README's observability paragraph promises, as Ray exports it."""


def test_serve_status_names_versions_replicas_and_traffic(tiny_run, ray_cluster):
    url = tiny_run["report"]["serve"]["url"]
    with Client(url, MODEL) as client:
        assert client.complete("KING.\n", max_tokens=4)
    refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "max_tokens": -1})
    assert refused.status_code == 400
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"]}
    (status,) = commands(block_with("rayllm serve status"))  # the README's command
    deadline = time.time() + 90  # Ray's agents export every few seconds
    while True:
        done = subprocess.run(
            [sys.executable, "-m", "rayllm.cli", *status, "--app", "rayllm", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (app,) = json.loads(done.stdout)
        (model,) = app["models"]
        if {"200", "400"} <= set(app["requests"]) and model["ttft_s"] or time.time() > deadline:
            break
        time.sleep(5)
    assert app["status"] == "RUNNING" and app["requests"]["400"] >= 1, app
    assert model["version"] == tiny_run["report"]["registry"]["ref"]
    assert model["replicas"] == {"RUNNING": 1}
    assert model["ttft_s"] > 0 and model["generated_tokens"] >= 4, model

    text = httpx.get(ray_cluster["metrics"], timeout=30).text
    missing = [what for what, name in METRICS.items() if f"\n{name}{{" not in text]
    assert not missing, missing
