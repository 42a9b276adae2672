"""Checkpoints that survive: a run whose workers sit on different nodes loses one node mid-run,
restarts the worker group from the last checkpoint on the nodes left, and ends where an
uninterrupted run on one node ends; a training job stopped with ``ray job stop`` and resumed
explicitly does the same; a resume that does not fit the checkpoint is refused before any
worker starts."""

import json
import re
import threading
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus
from ray.util.state import list_actors

from rayllm.config import build_config
from rayllm.errors import RayllmError
from rayllm.paths import filesystem
from rayllm.registry.store import Registry
from rayllm.train.checkpoint import latest_checkpoint
from rayllm.train.config import TrainConfig
from rayllm.train.metrics import METRICS_LOG
from rayllm.train.trainer import run
from tests.conftest import TINY_MODEL, WorkerNodes, overrides
from tests.test_jobs import readme_job, run_job, submit, wait

pytestmark = pytest.mark.slow

STEPS, EVERY = 60, 15


def settings_for(tiny_run, tmp_path, name: str, **changes) -> dict:
    return {
        "data": str(tiny_run["workdir"] / "data"),
        "storage": str(tmp_path / "runs"),
        "output": str(tmp_path / name),
        "run_name": name,
        "steps": STEPS,
        "micro_batch_size": 4,
        "cpus_per_worker": 0.5,
        "log_every": 10,
        "eval_every": STEPS,
        "checkpoint_every": EVERY,
        "eval_batches": 1,
        "parallel": {"strategy": "fsdp"},
        "model": TINY_MODEL,
    } | changes


def config_for(tiny_run, tmp_path, name: str, **changes) -> TrainConfig:
    return build_config(TrainConfig, settings_for(tiny_run, tmp_path, name, **changes))


def losses(config: TrainConfig) -> dict[int, float]:
    fs, folder = filesystem(f"{config.storage}/{config.run_name}")
    lines = fs.cat_file(f"{folder}/{METRICS_LOG}").decode().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


def run_losing_a_node(config: TrainConfig, nodes: WorkerNodes) -> tuple[dict, set[str]]:
    """Run ``config`` in a thread; as soon as the first checkpoint is written, remove a worker
    node that holds one of the run's workers. Returns the run's outcome (its result or its
    exception) and the nodes the workers ran on before."""
    outcome = {}

    def target():
        try:
            outcome["result"] = run(config)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    folder = f"{config.storage}/{config.run_name}"
    placed: set[str] = set()
    deadline = time.time() + 300
    while latest_checkpoint(folder) is None:
        assert time.time() < deadline and thread.is_alive(), outcome
        if len(placed) < config.num_workers:
            alive = list_actors(
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            )
            placed = {actor.node_id for actor in alive}
        time.sleep(0.02)
    lost = next(node for node in placed if node in nodes.alive().values())
    nodes.remove(lost)
    thread.join(timeout=600)
    return outcome, placed


@pytest.fixture(scope="module")
def straight(tiny_run, ray_cluster, tmp_path_factory):
    config = config_for(tiny_run, tmp_path_factory.mktemp("straight"), "straight")
    return config, run(config)


def test_a_run_over_nodes_loses_one_restarts_on_the_others_and_ends_the_same(
    straight, tiny_run, worker_nodes, s3, tmp_path
):
    """Two workers on two nodes of the three (STRICT_SPREAD), checkpoints and metrics in object
    storage, as nodes of their own need; once the first checkpoint is written, a worker node
    holding one of them is removed (its raylet and every process on it killed). The group
    restarts from that checkpoint on the nodes left and ends where the run on one node ends,
    step for step."""
    config = config_for(
        tiny_run,
        tmp_path,
        "node-lost",
        max_failures=1,
        placement_strategy="STRICT_SPREAD",
        storage=f"s3://{s3['bucket']}/runs",
    )
    outcome, placed = run_losing_a_node(config, worker_nodes)
    assert len(placed) == 2, placed
    assert "result" in outcome, outcome
    reference_config, reference = straight
    assert outcome["result"].metrics["loss"] == pytest.approx(reference.metrics["loss"], abs=1e-5)
    assert losses(config) == pytest.approx(losses(reference_config), abs=1e-5)


def test_a_stopped_training_job_resumes_ends_the_same_and_is_published_and_scored(
    straight, tiny_run, ray_cluster, tmp_path
):
    """``jobs/train.py`` through the Jobs SDK, stopped (``ray job stop``) once it has written a
    checkpoint; a second job with ``resume=true`` ends where the straight run ends;
    ``jobs/publish.py`` publishes the model it wrote, and ``jobs/eval.py`` scores that version."""
    settings = settings_for(tiny_run, tmp_path, "stopped", max_failures=0)
    config = build_config(TrainConfig, settings)
    dashboard = ray_cluster["dashboard"]
    entrypoint = readme_job("jobs/train.py", str(tmp_path))[0]
    client, job = submit(dashboard, entrypoint, *overrides(settings))
    run_folder = f"{config.storage}/stopped"
    deadline = time.time() + 300
    while latest_checkpoint(run_folder) is None:
        assert time.time() < deadline, client.get_job_logs(job)[-4000:]
        assert not client.get_job_status(job).is_terminal(), client.get_job_logs(job)[-4000:]
        time.sleep(0.05)
    client.stop_job(job)
    assert wait(client, job) == JobStatus.STOPPED
    step = latest_checkpoint(run_folder)[1]["step"]
    assert 0 < step < STEPS

    other = config.model_dump() | {"resume": True, "parallel": {"strategy": "ddp"}}
    with pytest.raises(RayllmError, match="different parallel"):
        run(TrainConfig.model_validate(other))

    logs, _ = run_job(dashboard, entrypoint, *overrides(settings | {"resume": True}))
    assert f"model written to {config.output}" in logs
    reference_config, reference = straight
    assert losses(config) == pytest.approx(losses(reference_config), abs=1e-5)
    with pytest.raises(RayllmError, match="already finished"):
        run(config.model_copy(update={"resume": True}))

    publish = readme_job("jobs/publish.py", str(tmp_path))  # /shared/work -> tmp_path
    publish = [config.output if word.endswith("/model-bible") else word for word in publish]
    logs, _ = run_job(dashboard, *publish)
    assert "published bible:1" in logs
    assert Registry(str(tmp_path / "registry")).resolve("bible").ref == "bible:1"

    data = str(tiny_run["workdir"] / "data")
    score = readme_job("jobs/eval.py", str(tmp_path))
    logs, _ = run_job(dashboard, *(f"data={data}" if w.startswith("data=") else w for w in score))
    perplexity = float(re.search(r"bible:1: held-out perplexity ([\d.]+)", logs).group(1))
    assert 1 < perplexity < 1024  # the tiny model's vocabulary: better than chance


def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(
    tiny_run, ray_cluster, tmp_path
):
    config = config_for(
        tiny_run, tmp_path, "diverging", learning_rate=1e4, warmup_steps=0, checkpoint_every=1
    )
    with pytest.raises(RayllmError, match=r"NaN or infinite at step (\d+)") as error:
        run(config)
    step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    url, progress = latest_checkpoint(f"{config.storage}/diverging")
    assert progress["step"] == step - 1
    assert url in str(error.value)
    assert not Path(config.output).exists()


def test_ray_data_ingestion_streams_each_rank_its_split(tiny_run, ray_cluster, tmp_path):
    config = config_for(
        tiny_run, tmp_path, "streamed", data_loader="ray_data", steps=40, checkpoint_every=40
    )
    result = run(config)
    logged = losses(config)
    assert sorted(logged) == [10, 20, 30, 40]
    assert logged[40] < logged[10] - 0.1
    assert result.metrics["val_loss"] < 7.0
