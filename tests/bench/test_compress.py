"""``rayllm bench compress`` on the tiny model: the source is copied into the benchmark's own
registry, quantized, factorised and distilled there (a student trained on the session
cluster), and all generate under the same load (transformers here: a vLLM start per version
is the benchmark's cost, not the test's); each row's ratios are against the source's row."""

import json
import math
import os
import subprocess
import sys

import pytest

from rayllm.bench.compress import benchmark, parse_method
from rayllm.bench.load import Load
from rayllm.errors import RayllmError
from rayllm.registry.store import Registry


def test_methods_are_nested_compress_settings():
    assert parse_method("method=prune,prune.structure=layers,prune.sparsity=0.5") == {
        "method": "prune",
        "prune": {"structure": "layers", "sparsity": 0.5},
    }
    with pytest.raises(RayllmError, match="comma-separated KEY=VALUE"):
        parse_method("prune")


def test_a_method_vllm_cannot_serve_needs_hf_generate(tmp_path, monkeypatch):
    """Refused before the source is read or anything compressed."""
    monkeypatch.setenv("RAYLLM_CACHE", str(tmp_path))
    with pytest.raises(RayllmError, match="--method method=share: .*--system 'hf generate'"):
        benchmark(
            "no-such-model",
            str(tmp_path / "no-registry"),
            str(tmp_path / "no-data"),
            ["method=share"],
            None,
            {},
            Load(2, 4, concurrency=1),
            "rayllm",
            {},
            8,
        )


@pytest.mark.slow
def test_bench_compress_measures_methods_against_their_source(tiny_run, ray_cluster, tmp_path):
    root = tiny_run["settings"]["registry"]["root"]
    command = [sys.executable, "-m", "rayllm.cli", "bench", "compress", "--json"]
    command += ["--source", "tiny-shakespeare:1", "--registry", root]
    command += ["--data", str(tiny_run["workdir"] / "data"), "--system", "hf generate"]
    command += ["--method", "method=quantize,quantize.algorithm=rtn,eval_rows=16"]
    command += ["--method", "method=low_rank,low_rank.rank=8,eval_rows=16"]  # transformers only
    train = "steps=4,micro_batch_size=2,cpus_per_worker=0.5,eval_batches=1,checkpoint_every=4"
    train += f",storage={tmp_path / 'runs'}"
    distill = "method=distill,eval_rows=16," + ",".join(
        f"distill.train.{s}" for s in train.split(",")
    )
    command += ["--method", distill, "--requests", "2", "--output-tokens", "4"]
    command += ["--concurrency", "1"]
    env = os.environ | ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"]}
    env |= {"RAYLLM_CACHE": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout holds the JSON alone
    source, int4, factorised, student = result["rows"]
    assert (source["method"], source["version"]) == ("source", "tiny-shakespeare-1:1")
    assert source["size_vs_source"] == source["speed_vs_source"] == 1.0
    assert int4["version"] == "tiny-shakespeare-1-w4a16:1" and int4["bytes"] < source["bytes"]
    assert int4["output_tokens_per_s"] > 0 and int4["compress_seconds"] > 0
    assert int4["speed_vs_source"] == int4["output_tokens_per_s"] / source["output_tokens_per_s"]
    assert int4["perplexity_vs_source"] == pytest.approx(
        math.exp(int4["val_loss"] - source["val_loss"])
    )
    assert factorised["version"] == "tiny-shakespeare-1-low-rank:1"
    assert factorised["bytes"] < source["bytes"] and factorised["output_tokens_per_s"] > 0
    assert student["version"] == "tiny-shakespeare-1-distilled:1"  # trained on Ray Train
    assert student["bytes"] < source["bytes"] and student["output_tokens_per_s"] > 0
    bench = Registry(str(tmp_path / "bench" / "registry"))
    for result in ("w4a16", "distilled"):
        lineage = bench.resolve(f"tiny-shakespeare-1-{result}").lineage
        assert lineage["parent"] == "tiny-shakespeare-1:1"
    assert "tiny-shakespeare-1" not in Registry(root).models()  # the user's registry untouched
