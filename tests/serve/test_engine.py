"""The replica's engine (``rayllm.serve.server.ModelEngine``): what it relies on in Ray 2.60's
internal ``VLLMEngine``, and, on the session's served model, a one-rank CPU model computed in
vLLM's engine-core process with no worker process beside it."""

import inspect

import psutil
import pytest
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.util.state import list_actors

from rayllm.serve.server import ModelEngine


def test_the_method_rayllm_overrides_exists_as_expected():
    parameters = list(inspect.signature(VLLMEngine._start_async_llm_engine).parameters)
    assert parameters == ["self", "vllm_engine_args", "vllm_engine_config", "placement_group"]
    assert issubclass(ModelEngine, VLLMEngine)


@pytest.mark.slow
def test_the_replica_computes_in_the_engine_core_process(tiny_run, ray_cluster):
    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    replica = next(a for a in actors if a.class_name.startswith("ServeReplica:rayllm:ModelServer"))
    processes = [" ".join(p.cmdline()) for p in psutil.Process(replica.pid).children(True)]
    assert [p for p in processes if "VLLM::EngineCore" in p], processes
    assert not [p for p in processes if "VLLM::Worker" in p], processes
