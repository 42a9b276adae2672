"""The serving benchmark's parts: the load generator against the session's served app, and
``rayllm bench serve`` with vLLM's own server and Hugging Face generate on the tiny model."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from rayllm.bench.load import Load, RequestTiming, run_load, summarise
from rayllm.bench.serve import parse_variant, prompts
from rayllm.errors import RayllmError
from rayllm.serve.config import ServeConfig
from tests.test_readme import block_with, commands


def test_a_load_is_either_closed_or_open_loop():
    with pytest.raises(ValueError, match="either concurrency"):
        Load(4, 8)
    with pytest.raises(ValueError, match="either concurrency"):
        Load(4, 8, concurrency=2, rate=1.0)
    assert Load(4, 8, rate=2.5).name == "Poisson 2.5 req/s"


def test_the_summary_counts_what_users_wait_for():
    fast = RequestTiming(started=0.0, chunk_times=[0.1, 0.2, 0.3], output_tokens=5, finished=0.5)
    slow = RequestTiming(started=1.0, chunk_times=[1.3, 1.9], output_tokens=3, finished=1.9)
    failed = RequestTiming(started=2.0, error="503: overloaded", finished=2.1)
    summary = summarise([fast, slow, failed], duration_s=2.0)
    assert summary["failed"] == 1 and summary["errors"] == ["503: overloaded"]
    assert summary["output_tokens_per_s"] == 4.0  # 8 tokens of the finished requests in 2 s
    assert summary["ttft_p50_ms"] == pytest.approx(200)  # 100 and 300 ms
    assert summary["tpot_mean_ms"] == pytest.approx((100 + 300) / 2)  # 0.4/4 and 0.6/2 s
    assert summary["itl_p99_ms"] == pytest.approx(600, rel=0.05)


def test_prompts_have_the_asked_length_after_the_shared_prefix():
    texts = prompts(5, 12)
    assert len(texts) == 5 and len(set(texts)) == 5
    assert all(len(text.split()) == 12 for text in texts)
    shared = prompts(5, 12, shared_words=30)
    assert all(len(text.split()) == 42 for text in shared) and len(set(shared)) == 5
    assert len({" ".join(text.split()[:30]) for text in shared}) == 1


def test_replica_variants_run_on_ray_serve_against_vllm_run_once():
    """A variant of a replica setting (``stream_batching_ms``, ``cpus_per_replica``) runs on the
    Ray Serve systems; vLLM's server, which has no replicas, runs once per engine setting, the
    baseline of every variant sharing it."""
    from rayllm.bench.serve import _add_ratios, _variants

    small = {"kv_cache_gib": 0.5}
    variants = [{}, {"stream_batching_ms": 10}, small | {"cpus_per_replica": 2}]
    assert _variants("rayllm", variants) == variants
    assert _variants("vllm", variants) == [{}, small]
    rows = [
        {"system": "vllm", "variant": "", "load": "c8", "output_tokens_per_s": 100.0},
        {"system": "vllm", "variant": "kv_cache_gib=0.5", "load": "c8", "output_tokens_per_s": 50},
        {"system": "rayllm", "variant": "stream_batching_ms=10", "load": "c8"},
        {"system": "rayllm", "variant": "kv_cache_gib=0.5,cpus_per_replica=2", "load": "c8"},
    ]
    rows[2]["output_tokens_per_s"] = rows[3]["output_tokens_per_s"] = 90.0
    _add_ratios(rows, ["", "kv_cache_gib=0.5", "", "kv_cache_gib=0.5"])
    assert [row["vs_vllm_tokens_per_s"] for row in rows] == [1.0, 1.0, 0.9, 1.8]


def test_variants_name_engine_or_replica_settings_and_bad_ones_are_refused():
    assert parse_variant("kv_cache_gib=0.05,prefix_caching=false") == {
        "kv_cache_gib": 0.05,
        "prefix_caching": False,
    }
    with pytest.raises(RayllmError, match="KEY one of kv_cache_gib, prefix_caching"):
        parse_variant("port=1")
    with pytest.raises(ValueError, match="kv_cache_gib must be above 0"):
        parse_variant("kv_cache_gib=0")
    assert parse_variant("cpus_per_replica=2,stream_batching_ms=5") == {
        "cpus_per_replica": 2,
        "stream_batching_ms": 5,
    }
    with pytest.raises(ValueError, match="cpus_per_replica must be above 0"):
        parse_variant("cpus_per_replica=0")
    assert parse_variant("tensor_parallel_size=2") == {"tensor_parallel_size": 2}
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1"):
        parse_variant("tensor_parallel_size=0")


@pytest.mark.parametrize(
    "settings",
    [
        {"kv_cache_gib": 0.05, "prefix_caching": False, "tensor_parallel_size": 2},
        {
            "max_model_len": 128,
            "engine_kwargs": {"max_num_batched_tokens": 512, "allowed_media_domains": ["a", "b"]},
        },
        {
            "use_gpu": True,
            "kv_offload_gib": 4,
            "weight_offload_gib": 0.5,
            "engine_kwargs": {
                "gpu_memory_utilization": 0.5,
                "override_generation_config": {"temperature": 0.5},
            },
        },
    ],
    ids=["cpu", "cpu-engine-kwargs", "gpu-offload"],
)
def test_vllms_server_gets_the_engine_arguments_of_a_replica(settings, tmp_path):
    """The flags the benchmark starts vLLM's own server with, read back by vLLM's own parser,
    are the engine arguments a replica of the same settings gets, on CPUs and on GPUs."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from rayllm.bench.serve import vllm_server_flags
    from rayllm.serve.app import engine_arguments
    from rayllm.serve.node_cpus import local_cpus

    config = ServeConfig.model_validate({"model": "m:1"} | settings)
    expected = engine_arguments(config, bool(config.use_gpu), "m:1", local_cpus())
    parser = make_arg_parser(FlexibleArgumentParser())
    parsed = AsyncEngineArgs.from_cli_args(
        parser.parse_args(["--model", str(tmp_path), *vllm_server_flags(config)])
    )
    for key, value in expected.items():
        assert getattr(parsed, key) == value, key


def test_the_readme_gpu_serving_benchmark_is_refused_on_a_machine_without_gpus(tmp_path):
    """Before any cluster starts or the benchmark's model is published; so is an offload
    variant on CPUs."""
    block = block_with("bench serve --gpu").replace("\\\n", " ")
    (gpu,) = [command for command in commands(block) if "--gpu" in command]
    offload = ["bench", "serve", "--system", "vllm", "--variant", "kv_offload_gib=2"]
    for args, message in (
        (gpu, "--gpu needs 1 GPUs (one per tensor-parallel rank) but this machine has 0"),
        (offload, "bench-28m: kv_offload_gib offloads GPU memory to the CPU"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "rayllm.cli", *args],
            capture_output=True,
            text=True,
            env=os.environ | {"RAYLLM_CACHE": str(tmp_path)},
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_load_generator_streams_exact_lengths_from_the_served_app(tiny_run):
    url = tiny_run["report"]["serve"]["url"]
    texts = prompts(4, 6)
    for load in (Load(6, 5, concurrency=3), Load(4, 5, rate=4.0)):
        summary = asyncio.run(run_load(url, "tiny-shakespeare", texts, load))
        assert summary["failed"] == 0, summary["errors"]
        assert summary["output_tokens"] == load.requests * 5  # ignore_eos: exactly 5 each
        assert 0 < summary["ttft_p50_ms"] <= summary["e2e_p50_ms"]


def test_the_rayllm_systems_refuse_a_shared_cluster():
    done = subprocess.run(
        [sys.executable, "-m", "rayllm.cli", "bench", "serve", "--system", "rayllm"],
        capture_output=True,
        text=True,
        env=os.environ | {"RAY_ADDRESS": "127.0.0.1:1"},
    )
    assert done.returncode == 2
    assert "starts its own Ray cluster" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_bench_serve_measures_vllm_and_hf_generate_on_a_registry_version(tiny_run):
    registry = tiny_run["settings"]["registry"]["root"]
    command = [sys.executable, "-m", "rayllm.cli", "bench", "serve", "--json"]
    command += ["--registry", registry, "--model", "tiny-shakespeare"]
    command += ["--system", "vllm", "--system", "hf generate", "--concurrency", "2"]
    command += ["--requests", "4", "--output-tokens", "6", "--hf-requests", "2"]
    command += ["--variant", "kv_cache_gib=0.05,prefix_caching=false", "--shared-prefix-words", "8"]
    command += ["--variant", "kv_cache_gib=0.05,prefix_caching=false,stream_batching_ms=10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout holds the JSON alone
    assert result["model"] == "tiny-shakespeare:1"
    vllm, hf = result["rows"]  # the second variant differs in a replica setting: no vLLM rerun
    assert (vllm["system"], vllm["load"], vllm["failed"]) == ("vllm", "concurrency 2", 0)
    assert vllm["variant"] == "kv_cache_gib=0.05,prefix_caching=False"
    assert vllm["output_tokens"] == 4 * 6 and vllm["vs_vllm_tokens_per_s"] == 1.0
    assert (hf["system"], hf["output_tokens"]) == ("hf generate", 2 * 6)
    assert vllm["vs_hf_generate"] == vllm["output_tokens_per_s"] / hf["output_tokens_per_s"]
