"""The replica's engine (``rayllm.serve.server.ModelEngine``): what it relies on in Ray 2.60's
internal ``VLLMEngine``, and, on the session's served model, a one-rank CPU model computed in
vLLM's engine-core process with no worker process beside it, in one bundle of the replica's
CPUs (the replica actor takes none of its own), its compute threads set from them."""

import inspect

import pytest
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.util.state import list_actors, list_placement_groups

from rayllm.serve.server import ModelEngine
from tests.conftest import engine_processes


def test_the_method_rayllm_overrides_exists_as_expected():
    parameters = list(inspect.signature(VLLMEngine._start_async_llm_engine).parameters)
    assert parameters == ["self", "vllm_engine_args", "vllm_engine_config", "placement_group"]
    assert issubclass(ModelEngine, VLLMEngine)


@pytest.mark.slow
def test_the_replica_computes_in_the_engine_core_process_on_its_cpus(tiny_run, ray_cluster):
    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
    replica = next(a for a in actors if a.class_name.startswith("ServeReplica:rayllm:ModelServer"))
    engines, processes = engine_processes(replica)
    assert len(engines) == 1, processes
    assert not [p for p in processes if "VLLM::Worker" in p], processes

    cpus = 1.0  # the lifecycle's serve settings leave cpus_per_replica at its default
    group = list_placement_groups(
        filters=[("placement_group_id", "=", replica.placement_group_id)], detail=True
    )[0]
    assert [bundle["unit_resources"] for bundle in group.bundles] == [{"CPU": cpus}]
    assert engines[0].environ()["OMP_NUM_THREADS"] == "1"
