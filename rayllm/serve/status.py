"""What is served: each Serve app, its models with the registry versions they serve, their
replicas, and what the metrics Ray exports say about their traffic.

Ray exports Serve's request metrics and vLLM's engine metrics (``ray.serve.llm`` turns them on
with ``log_engine_metrics``) in Prometheus format from every node's metrics agent, where
Prometheus scrapes them (Ray writes a scrape config under the session's
``metrics/prometheus``). ``rayllm serve status`` reads the same endpoints once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rayllm.errors import RayllmError
from rayllm.serve.app import model_deployment, running_config
from rayllm.serve.config import ModelEntry

REQUESTS = "ray_serve_num_http_requests_total"
"""Requests the proxies answered, by application, route and status code."""
TTFT = "ray_vllm_time_to_first_token_seconds"
"""Time to first token (a histogram), by served model."""
OUTPUT_TOKEN_TIME = "ray_vllm_request_time_per_output_token_seconds"
"""Time per output token of each finished request (a histogram), by served model."""
GENERATED = "ray_vllm_generation_tokens_total"
WAITING = "ray_vllm_num_requests_waiting"
"""Requests queued in the engines, waiting for a place in the batch."""
HEALTHY = "ray_serve_deployment_replica_healthy"
"""1 for each running replica, by application, deployment and replica id."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class ModelStatus:
    model_id: str
    follows: str
    """The registry reference the model follows (an alias, a name, a version)."""
    version: str
    """The version its replicas serve."""
    status: str
    replicas: dict[str, int]
    """Replica state (RUNNING, STARTING...) -> how many."""
    message: str
    ttft_s: float | None = None
    """Mean time to first token over the running replicas' requests."""
    output_token_s: float | None = None
    """Mean time per output token."""
    generated_tokens: float = 0.0
    waiting: float = 0.0


@dataclass
class AppStatus:
    name: str
    status: str
    message: str
    models: list[ModelStatus] = field(default_factory=list)
    """Empty for an app ``rayllm serve`` did not build."""
    requests: dict[str, float] = field(default_factory=dict)
    """HTTP status code -> requests answered with it."""


def serve_status(app_name: str | None = None) -> list[AppStatus]:
    """Every Serve app on the cluster (or only ``app_name``), with its traffic so far."""
    from ray import serve

    samples = scrape()
    apps = []
    for name, app in serve.status().applications.items():
        if app_name is not None and name != app_name:
            continue
        status = AppStatus(name, app.status.value, app.message)
        status.requests = _by_label(samples, REQUESTS, "status_code", application=name)
        for entry in _served_models(name):
            deployment_name = model_deployment(app.deployments, entry.model_id)
            deployment = app.deployments[deployment_name]
            model = ModelStatus(
                model_id=entry.model_id,
                follows=entry.model,
                version=entry.version,
                status=deployment.status.value,
                replicas=dict(deployment.replica_states),
                message=deployment.message,
            )
            _engine_figures(model, samples, name, deployment_name)
            status.models.append(model)
        apps.append(status)
    return apps


def _served_models(app_name: str) -> list[ModelEntry]:
    """The models of an app ``rayllm serve`` built; none for any other app."""
    try:
        return running_config(app_name).models
    except RayllmError:
        return []


def scrape() -> list[Sample]:
    """The metrics of every live node's metrics agent (nodes that do not answer are left
    out: their figures come back when they do)."""
    import ray

    samples = []
    for node in ray.nodes():
        if not node["Alive"] or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            samples += [Sample(s.name, s.labels, s.value) for s in family.samples]
    return samples


def _by_label(samples: list[Sample], name: str, label: str, **match: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for sample in _matching(samples, name, **match):
        totals[sample.labels.get(label, "")] += sample.value
    return dict(totals)


def _matching(samples: list[Sample], name: str, **match: str) -> list[Sample]:
    return [
        sample
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items())
    ]


def _total(samples: list[Sample], name: str, **match: str) -> float:
    return sum(sample.value for sample in _matching(samples, name, **match))


def _mean(samples: list[Sample], histogram: str, **match: str) -> float | None:
    count = _total(samples, f"{histogram}_count", **match)
    return _total(samples, f"{histogram}_sum", **match) / count if count else None


def _engine_figures(
    model: ModelStatus, samples: list[Sample], app_name: str, deployment: str
) -> None:
    """vLLM's figures for the model, summed over its running replicas (vLLM labels them by
    replica id, which Serve's health gauge maps to the app and deployment)."""
    running = {
        sample.labels["replica"]
        for sample in _matching(samples, HEALTHY, application=app_name, deployment=deployment)
        if sample.value == 1
    }
    engines = [sample for sample in samples if sample.labels.get("ReplicaId") in running]
    model.ttft_s = _mean(engines, TTFT)
    model.output_token_s = _mean(engines, OUTPUT_TOKEN_TIME)
    model.generated_tokens = _total(engines, GENERATED)
    model.waiting = _total(engines, WAITING)
