"""Autoscaling on engine load: the policy's decisions, its place in the app's config, and
(on the session cluster grown by two worker nodes) replicas rising under a burst of requests,
surviving a lost node and falling after it."""

import asyncio
import time
import warnings

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from rayllm.serve.app import ENGINE_LOAD_POLICY, autoscaling
from rayllm.serve.autoscaling import EngineLoadPolicy
from rayllm.serve.config import ModelEntry, ServeConfig
from tests.conftest import (
    WORKER_NODE,
    engine_processes,
    overrides,
    replica_actors,
    replica_states,
)
from tests.test_jobs import readme_job, submit, wait


def context(replicas: int, requests: float, loads: list[float]) -> AutoscalingContext:
    deployment = DeploymentID(name="ModelServer:m", app_name="app")
    running = [ReplicaID(f"r{n}", deployment) for n in range(replicas)]
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name=deployment.name,
        app_name=deployment.app_name,
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=running,
        total_num_requests=requests,
        total_queued_requests=0,
        aggregated_metrics={"engine_load": dict(zip(running, loads, strict=True))},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=AutoscalingConfig(min_replicas=1, max_replicas=4),
    )


def test_replicas_follow_the_mean_engine_load_against_the_target():
    policy = EngineLoadPolicy(target_engine_load=0.5)
    assert policy(context(1, 12, [1.5]))[0] == 3  # requests queue: 1.5 / 0.5
    assert policy(context(2, 12, [0.5, 0.5]))[0] == 2  # at the target: stay
    assert policy(context(3, 2, [0.1, 0.2, 0.0]))[0] == 1  # light load: fewer
    assert policy(context(2, 0, [0.9, 0.9]))[0] == 0  # nothing in flight: stale figures ignored


def test_the_app_config_names_the_policy_and_its_delays():
    entry = ModelEntry(
        model="m", target_engine_load=0.6, upscale_delay_s=5, look_back_period_s=12, max_replicas=3
    )
    config = autoscaling(entry)
    assert config["policy"] == {
        "policy_function": ENGINE_LOAD_POLICY,
        "policy_kwargs": {"target_engine_load": 0.6},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Serve accepts it as it is, without a warning
        accepted = AutoscalingConfig(**config)
    assert (accepted.upscale_delay_s, accepted.look_back_period_s) == (5, 12)
    requests = autoscaling(ModelEntry(model="m", autoscale_on="requests"))
    assert "policy" not in requests and requests["target_ongoing_requests"] == 8


@pytest.mark.parametrize("target", [0, 1.5])
def test_the_target_is_a_fraction(target):
    with pytest.raises(ValueError, match="target_engine_load is a fraction"):
        ServeConfig(target_engine_load=target)


def test_the_window_is_longer_than_serves_metrics_interval():
    with pytest.raises(ValueError, match="look_back_period_s must be above 10"):
        ServeConfig(look_back_period_s=10)


def test_a_model_may_scale_to_zero_but_not_be_capped_at_zero():
    assert autoscaling(ModelEntry(model="m", min_replicas=0))["min_replicas"] == 0
    with pytest.raises(ValueError, match="max_replicas >= 1"):
        ServeConfig(min_replicas=0, max_replicas=0)


USERS = 6
"""Clients in the burst: a load of 3 against the target of 0.5 on one replica."""


@pytest.mark.slow
def test_cpu_features_are_read_on_every_node_a_replica_may_use(worker_nodes):
    """What decides a CPU replica's dtype and int4 kernel is read by a task on each alive node
    whose resources hold a replica: the two worker nodes for ``replica_resources`` naming
    theirs, the head too for CPUs alone; where none holds one yet, this node's."""
    from rayllm.serve.node_cpus import engine_node_cpus, local_cpus

    on_workers = engine_node_cpus({"CPU": 1, WORKER_NODE: 1})
    assert on_workers.nodes == len(worker_nodes.alive()) == 2
    assert on_workers.flags == local_cpus().flags  # one host here: the same processor
    assert engine_node_cpus({"CPU": 1}).nodes == 3
    assert engine_node_cpus({"CPU": 1, "rayllm_test_no_such_node": 1}) == local_cpus()


@pytest.mark.slow
def test_replicas_rise_under_a_burst_survive_a_lost_node_and_fall_to_zero(
    tiny_run, ray_cluster, serve_port, worker_nodes
):
    """One model scaled to zero, 2 sequences per replica, short delays, its replicas only on the
    two worker nodes (one each: ``replica_resources``; both of a node's CPUs, its engine
    computing on one), never on the driver's, each resolving its version from the S3 registry.
    The first request starts a replica (the cold start); 6 clients sending long completions then
    fill its engine (load 3 against a target of 0.5) and Serve starts a second. Once both run,
    under the burst, one's node is removed (its raylet and every process on it killed) and every
    request is answered by the replica left: Serve sends again what the dead replica had not
    accepted, the ingress answers 503 for what it had, and the clients retry those. When the
    clients stop, every replica goes (the one Serve asks for in the lost one's place has no node
    to start on). No request fails.
    The app is served by a Ray job (``jobs/serve.py``); stopping the job removes it."""
    import ray
    from ray import serve
    from ray.job_submission import JobStatus

    from rayllm.client import AsyncClient

    settings = {
        "registry": tiny_run["settings"]["registry"]["root"],
        "model": "tiny-shakespeare:1",
        "app_name": "scaling",
        "route_prefix": "/scaling",
        "port": serve_port,
        "min_replicas": 0,
        "max_replicas": 2,
        "max_num_seqs": 2,
        "target_engine_load": 0.5,
        "upscale_delay_s": 2,
        "downscale_delay_s": 5,
        "look_back_period_s": 11,
        "target_ongoing_requests": 100,  # Serve's own policy would never add a replica here
        "replica_resources": {WORKER_NODE: 1},
        "cpus_per_replica": 2,  # all of a worker node's, the replica actor's included
    }
    entrypoint = readme_job("jobs/serve.py", "")[0]
    jobs, job = submit(ray_cluster["dashboard"], entrypoint, *overrides(settings))
    url = f"http://127.0.0.1:{serve_port}/scaling"
    try:
        deadline = time.time() + 300
        while "serving tiny-shakespeare:1 as tiny-shakespeare" not in jobs.get_job_logs(job):
            assert time.time() < deadline and not jobs.get_job_status(job).is_terminal(), (
                jobs.get_job_logs(job)[-3000:]
            )
            time.sleep(1)
        assert _replicas() == 0

        async def cold_start_then_burst() -> tuple[float, int]:
            stop = asyncio.Event()
            async with AsyncClient(url, "tiny-shakespeare", timeout=600) as client:
                started = time.perf_counter()
                assert await client.complete("KING.", max_tokens=4)
                cold_start = time.perf_counter() - started

                answered: list[str] = []

                async def user() -> None:
                    while not stop.is_set():
                        answered.append(
                            await client.complete("KING.", max_tokens=100, ignore_eos=True)
                        )

                users = [asyncio.create_task(user()) for _ in range(USERS)]
                await _until(lambda: _replicas("RUNNING") == 2, "no second replica")
                replicas = replica_actors("scaling", DEPLOYMENT)
                placed = {replica.node_id for replica in replicas.values()}
                assert placed == set(worker_nodes.alive().values())
                assert ray.get_runtime_context().get_node_id() not in placed
                threads = [
                    [e.environ()["OMP_NUM_THREADS"] for e in engine_processes(r)[0]]
                    for r in replicas.values()
                ]
                assert threads == [["1"], ["1"]]  # one of its 2 CPUs left to the front end
                # The node lost is one without the app's ingress (Serve placed it anywhere).
                ingress = {a.node_id for a in replica_actors("scaling", "Ingress").values()}
                lost = next(r for r in replicas.values() if r.node_id not in ingress)
                await asyncio.to_thread(worker_nodes.remove, lost.node_id)
                await _until(
                    lambda: (
                        lost.actor_id not in replica_actors("scaling", DEPLOYMENT)
                        and _replicas("RUNNING") == 1
                    ),
                    "the lost replica is still counted as running",
                )
                before = len(answered)
                await asyncio.sleep(5)  # the retried requests are answered, and new ones
                assert len(answered) > before, "nothing answered once the node was lost"
                stop.set()
                await asyncio.gather(*users)  # a failure raises
                return cold_start, len(answered)

        cold_start, served = asyncio.run(cold_start_then_burst())
        print(f"cold start {cold_start:.1f} s, {served} requests in the burst")
        assert served > 0
        deadline = time.time() + 180
        while _replicas() > 0:
            assert time.time() < deadline, "the replicas did not go after the burst"
            time.sleep(2)
        jobs.stop_job(job)  # the job's end is the app's (a Serve app outlives its driver)
        assert wait(jobs, job) == JobStatus.STOPPED
        deadline = time.time() + 60
        while "scaling" in serve.status().applications:
            assert time.time() < deadline, "stopping the job left its app serving"
            time.sleep(1)
    finally:
        if not jobs.get_job_status(job).is_terminal():
            jobs.stop_job(job)
        if "scaling" in serve.status().applications:
            serve.delete("scaling")


async def _until(condition, failure: str, timeout_s: float = 420) -> None:
    """Wait for ``condition`` (a blocking call: in a thread, while the clients run)."""
    deadline = time.time() + timeout_s
    while not await asyncio.to_thread(condition):
        assert time.time() < deadline, failure
        await asyncio.sleep(1)


DEPLOYMENT = "ModelServer:tiny-shakespeare"


def _replicas(*states: str) -> int:
    """The model's replicas in ``states``; running or starting (what the autoscaler has asked
    for) by default."""
    counted = replica_states("scaling", DEPLOYMENT)
    return sum(counted.get(state, 0) for state in states or ("RUNNING", "STARTING"))
