"""Shared fixtures: one object store, one Ray cluster and one tiny lifecycle per test session.

- ``s3``: a real S3 API (moto's server) on 127.0.0.1, reached through the same ``s3://`` URLs
  a user gives for AWS;
- ``ray_head``: a Ray cluster started the way the README says (``ray start --head``), with its
  own temp dir, ports (its Prometheus metrics' included) and auth token; the test process
  joins it (``ray_cluster``);
- ``tiny_run``: the README's ``ray job submit`` of ``jobs/lifecycle.py`` at reduced size,
  publishing to the S3 registry and leaving its model served for the tests that query it;
- ``worker_nodes``: two more nodes joined to that cluster for a module's multi-node tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from rayllm.serve.app import DIRECT_INGRESS_CLUSTER  # imports no Ray: set below before Ray reads it

# A session started in the background (`make test &`, nohup) inherits SIGINT ignored, and so
# would every command it starts: the tests that stop `rayllm serve` with Ctrl-C need it back.
signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The session's folder in /tmp (short: the sockets in it must keep to 97 characters): its
# cluster's token, Ray's temp dirs and Serve's HAProxy files, removed at its end.
# Ray workers that import a test module (to run a task defined there) import this file too:
# they find the session's folder in the environment they inherit, and create nothing.
if "RAYLLM_TEST_SESSION_DIR" not in os.environ:
    folder = Path(tempfile.mkdtemp(prefix="rayllm-t-", dir="/tmp"))
    (folder / "auth_token").write_text(secrets.token_hex(32))
    (folder / "hap").mkdir()
    os.environ["RAYLLM_TEST_SESSION_DIR"] = str(folder)
SESSION_DIR = Path(os.environ["RAYLLM_TEST_SESSION_DIR"])
# The session cluster's own token, set before anything imports Ray (which reads it once): a
# head that finds a token turns authentication on, as one that finds ~/.ray/auth_token does.
TOKEN = SESSION_DIR / "auth_token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(TOKEN)
os.environ["RAY_AUTH_MODE"] = "token"  # clients send it only when told to (README, On a cluster)
# Serve's HAProxy mode on the session cluster and in this driver (Serve reads it once), with
# the retries of a lost replica's requests, as `ingress: direct` needs them (README, Serving):
# the apps of every test run behind HAProxy.
os.environ.update(DIRECT_INGRESS_CLUSTER)
# In that mode a stopping ingress replica stays reachable 30 s (Ray's default) so that load
# balancers in front of the cluster deregister it; here Serve's HAProxy is the only one, on
# the same host: 5 s, and each app removal and rollout of the session is 25 s shorter. The
# rollout tests, which fail on any refused or dropped request, hold it to that.
os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "5"
# Ray Train's controller polls its workers every 2 s (Ray's default), and a run's end waits on
# about three polls: 0.25 s here (read by every driver of the session, and passed on to the
# controllers they start), and each training run of the session ends ~5 s sooner. A poll that
# misses its interval is waited on, not counted as a failure.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
# Ray Train starts a preemption watcher (an actor: a process of its own) for every run, to
# drain a spot node being taken back; no node of the session is: none (~1 s of a core a run).
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
# The head's GCS checks each node every 3 s and marks it dead after 5 failed checks (Ray's
# defaults): a lost node is noticed ~14 s after it goes. Every 1 s here (~6 s), and the tests
# that remove a node (autoscaling, training resumed on the nodes left) go on ~10 s sooner. A
# check still waits 10 s for its answer, so a busy node is not taken for a lost one.
os.environ["RAY_health_check_period_ms"] = "1000"  # noqa: SIM112 - Ray reads this case
# Serve's replicas and handles report their load to the controller every 10 s (Ray's default):
# 2 s here, and the autoscaling test's replicas follow its burst, and its end, that much sooner.
os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "2"
os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "2"
# Each node's log monitor looks for new log files on every pass (10 a second) until a node has
# 1,000 of them, then every 0.5 s: the session's head gathers hundreds over a run, and that
# search took ~4 % of a core. Every 0.5 s from the start (what is written is still read).
os.environ["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] = "0"
# vLLM's engines bind their sockets in /tmp and leave them there when a replica is killed:
# in the session's folder instead, which its end removes.
os.environ["VLLM_RPC_BASE_PATH"] = str(SESSION_DIR)

API_KEYS = "key-one,key-two"
"""The cluster's serving keys, as the README's serving section exports them: apps built on the
cluster (``serve deploy``) with ``api_keys_env: RAYLLM_API_KEYS`` read them there."""

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "rayllm-test"

TINY_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 128}
"""The smallest decoder vLLM's CPU kernels serve (head size 32)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Serve's HAProxy keeps its files in /tmp/haproxy-serve and its stats and metrics on ports 8404
# and 9101 (Ray's defaults), and outlives a cluster stopped under it, holding those ports: the
# session's own folder and free ports (so it meets no other cluster of this machine), and the
# session's end stops what is left of it (``pytest_sessionfinish``).
HAPROXY_DIR = SESSION_DIR / "hap"
os.environ |= {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{HAPROXY_DIR}/haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{HAPROXY_DIR}/admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{HAPROXY_DIR}/metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(HAPROXY_DIR),
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{HAPROXY_DIR}/server-state",
}
for port in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
    os.environ.setdefault(port, str(free_port()))  # a Ray worker keeps the session's


def pytest_sessionfinish(exitstatus: int) -> None:
    """Kill what outlives the session's nodes: HAProxy (its files in the session's folder)
    and a vLLM engine whose replica the cluster's stop killed (the session's environment is
    its own); remove the folder, cluster or not; after a failure, Ray's logs in it are kept."""
    import psutil

    this = psutil.Process()
    spared = {this.pid} | {parent.pid for parent in this.parents()}  # this run and its shell
    for process in psutil.process_iter(["cmdline", "environ"]):
        in_folder = any(str(SESSION_DIR) in arg for arg in process.info["cmdline"] or [])
        environ = process.info["environ"] or {}
        of_session = environ.get("RAYLLM_TEST_SESSION_DIR") == str(SESSION_DIR)
        if (in_folder or of_session) and process.pid not in spared:
            with contextlib.suppress(psutil.Error):
                process.kill()
    if exitstatus == 0:
        shutil.rmtree(SESSION_DIR, ignore_errors=True)
    else:
        print(f"\nthe session's Ray logs: {SESSION_DIR}/*/session_latest/logs")


def wait_for_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def overrides(settings: dict, prefix: str = "") -> list[str]:
    """``--set`` arguments for a nested dict of settings."""
    args = []
    for key, value in settings.items():
        if isinstance(value, dict):
            args += overrides(value, f"{prefix}{key}.")
        else:
            args += ["--set", f"{prefix}{key}={json.dumps(value)}"]
    return args


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on a free port; every process of the session (Ray's included, which
    inherit this environment) reaches it through fsspec's endpoint setting."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ |= {
        "FSSPEC_S3_ENDPOINT_URL": endpoint,  # s3fs (fsspec's configuration)
        "AWS_ENDPOINT_URL": endpoint,  # pyarrow's S3 filesystem, which Ray Data uses
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    import fsspec

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint  # fsspec is imported
    fsspec.filesystem("s3").mkdir(BUCKET)
    yield {"endpoint": endpoint, "bucket": BUCKET}
    server.terminate()
    server.wait()


@pytest.fixture(scope="session")
def ray_head(s3):
    """``ray start --head`` with its own temp dir, ports and token; stopped at the end. Its
    ports are picked free and bound by Ray moments later: where another process took one
    meanwhile (an outgoing connection, say), the head's agent fails to start, and the head is
    started again on other ports."""
    temp = str(SESSION_DIR / "head")
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "RAYLLM_API_KEYS": API_KEYS}
    for attempt in range(3):
        port, dashboard, metrics, agent = free_port(), free_port(), free_port(), free_port()
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={port}",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                f"--metrics-export-port={metrics}",
                f"--dashboard-agent-listen-port={agent}",  # not Ray's default: another
                f"--dashboard-agent-grpc-port={free_port()}",  # cluster on this machine may hold it
                "--num-cpus=8",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(dashboard, timeout_s=120)
            wait_for_port(agent, timeout_s=60)  # the agent's last port: all of them bound
            break
        except TimeoutError:
            stop(head)
            if attempt == 2:
                raise
    yield {
        "address": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard}",
        "metrics": f"http://127.0.0.1:{metrics}/metrics",
        "env": env,
        "temp_dir": temp,
    }
    stop(head)


def stop(node: subprocess.Popen) -> None:
    """Stop a node started with ``ray start --block`` in its own process group: signalled
    alone, it stops its processes in seconds (its whole group signalled at once, it waits half
    a minute on processes gone before their cleanup); what is left after 10 s is killed."""
    node.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """The HTTP port of the cluster's one Serve proxy: every app of the session uses it (Serve
    keeps the port it started with). Serve starts here with its proxy on the head node only:
    the nodes of ``worker_nodes`` share this host, where a proxy of their own cannot bind the
    same port, and Serve would restart it every few seconds for as long as they live (on a
    cluster, each node has its own address and the README's apps a proxy on every node)."""
    from ray import serve

    port = free_port()
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": "127.0.0.1", "port": port},
        logging_config={"log_level": "WARNING"},  # rayllm serve's own
    )
    return port


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """This test process joined to the session's cluster."""
    import ray

    ray.init(address=ray_head["address"], logging_level="WARNING")
    yield ray_head
    ray.shutdown()


WORKER_NODE = "rayllm_test_worker_node"
"""The custom resource every worker node of ``worker_nodes`` has one of (the head none)."""


class WorkerNodes:
    """Worker nodes joined to the session's cluster with ``ray start --address`` (each its own
    raylet, object store, agents and temp dir, with 2 CPUs, a resource named after it and one
    ``WORKER_NODE``), so work spreads over several nodes; ``remove`` kills one whole node, as a
    lost machine."""

    def __init__(self, cluster: dict):
        self.cluster = cluster
        self.processes: dict[str, subprocess.Popen] = {}

    def add(self, *names: str) -> None:
        """Start the nodes at once; return when all of them have joined. Their ports are picked
        free and bound by Ray moments later: a node whose process ended before it joined
        (another process took one of its ports meanwhile) is started again on other ports."""
        for name in names:
            self._start(name)
        starts = dict.fromkeys(names, 1)

        def joined() -> bool:
            for name in names:
                if self.processes[name].poll() is not None and starts[name] < 3:
                    self._start(name)
                    starts[name] += 1
            return set(names) <= set(self.alive())

        self._wait(joined, f"nodes {names} did not join")

    def _start(self, name: str) -> None:
        self.processes[name] = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                f"--address={self.cluster['address']}",
                "--num-cpus=2",
                f"--resources={json.dumps({name: 1, WORKER_NODE: 1})}",
                "--object-store-memory=200000000",
                f"--temp-dir={SESSION_DIR / name}",  # as on a machine of its own
                f"--metrics-export-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
            ],
            env=self.cluster["env"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # A process group of its own (to kill the node whole), in this session: a session
            # of its own would be a scheduler autogroup of its own, and Linux then starves a
            # vLLM worker pinned to the core another node's worker spins on.
            process_group=0,
        )

    def alive(self) -> dict[str, str]:
        """Node id of each of these nodes that is alive."""
        import ray

        return {
            name: node["NodeID"]
            for node in ray.nodes()
            if node["Alive"]
            for name in self.processes
            if name in node["Resources"]
        }

    def remove(self, node_id: str) -> str:
        """Kill the node with this id (a worker node of these): its raylet and every process on
        it. Returns its name once the cluster has marked it dead."""
        (name,) = [name for name, alive in self.alive().items() if alive == node_id]
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait()
        self._wait(lambda: name not in self.alive(), f"node {name} is still alive")
        return name

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                stop(process)

    @staticmethod
    def _wait(condition, failure: str, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while not condition():
            assert time.time() < deadline, failure
            time.sleep(0.5)


@pytest.fixture(scope="module")
def worker_nodes(ray_cluster):
    """The session's cluster with two more nodes for one module: a head and two workers."""
    nodes = WorkerNodes(ray_cluster)
    try:
        nodes.add("rayllm_test_node_a", "rayllm_test_node_b")
        yield nodes
    finally:
        nodes.close()


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, s3, serve_port, tmp_path_factory):
    """The README's ``ray job submit`` of the lifecycle, at reduced size, run once; several
    tests read its report, its registry (on S3) and its served endpoint."""
    work = tmp_path_factory.mktemp("lifecycle")
    settings = {
        "workdir": str(work),
        "model_name": "tiny-shakespeare",
        "registry": {"root": f"s3://{BUCKET}/registry"},
        "data": {
            "max_documents": 6000,
            "tokenizer": {"vocab_size": 1024},
            "seq_len": 64,
            "val_fraction": 0.05,
        },
        "train": {
            "steps": 12,
            "micro_batch_size": 4,
            "cpus_per_worker": 0.5,
            "log_every": 4,
            "eval_every": 6,
            "checkpoint_every": 6,
            "eval_batches": 2,
            "model": TINY_MODEL,
        },
        "serve": {"port": serve_port, "max_replicas": 1, "max_num_seqs": 4, "max_loras": 2},
        "prompts": ["ROMEO.\n", "JULIET.\n"],
        "max_tokens": 12,
    }
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_cluster["dashboard"],
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "jobs/lifecycle.py",
        "--config",
        "jobs/configs/lifecycle.yaml",
        *overrides(settings),
    ]
    env = ray_cluster["env"]  # RAY_AUTH_MODE=token, as the README says
    job = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    report_file = work / "lifecycle-report.json"
    assert job.returncode == 0 and report_file.exists(), job.stdout[-6000:] + job.stderr[-3000:]
    return {
        "report": json.loads(report_file.read_text()),
        "workdir": work,
        "job_output": job.stdout,
        "settings": settings,
    }


def replica_actors(app: str, deployment: str) -> dict[str, Any]:
    """The live actors of the replicas of one of a Serve app's deployments, by actor id."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.actor_id: a for a in actors if a.class_name == f"ServeReplica:{app}:{deployment}"}


def stored_serve_apps(ray_cluster: dict):
    """The dashboard's Serve API answer: every app with its deployments' stored configs, read
    with the cluster's Ray token."""
    import httpx

    token = {"Authorization": f"Bearer {TOKEN.read_text()}"}
    url = f"{ray_cluster['dashboard']}/api/serve/applications/"
    return httpx.get(url, headers=token, timeout=30)


def engine_processes(replica: Any, title: str = "VLLM::EngineCore") -> tuple[list[Any], list[str]]:
    """The vLLM engine-core processes (or others of vLLM's process ``title``) under a replica
    actor of this host, and the command lines of all its processes (a short-lived child that
    has exited meanwhile has none)."""
    import psutil

    def command_line(process: psutil.Process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.NoSuchProcess:  # a zombie too
            return ""

    children = psutil.Process(replica.pid).children(recursive=True)
    lines = [command_line(p) for p in children]
    engines = [p for p, line in zip(children, lines, strict=True) if title in line]
    return engines, lines


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """The replicas of one of a Serve app's deployments by state, as Serve counts them."""
    from ray import serve

    return serve.status().applications[app].deployments[deployment].replica_states


def publish_random_model(tiny_run, name: str, folder: Path, tie_embeddings: bool = False) -> str:
    """A random 2-layer decoder with two KV head groups (which pruning heads and tensor
    parallelism need and the session's model lacks), in the session model's tokenizer (so it
    reads the session's shards), published to the session's registry as ``name:1``."""
    import torch
    from transformers import AutoTokenizer

    from rayllm.model.config import ModelConfig
    from rayllm.model.hf import save_hf_model
    from rayllm.model.model import Transformer
    from rayllm.registry.importers import import_folder
    from rayllm.registry.store import Registry

    registry = Registry(tiny_run["settings"]["registry"]["root"])
    _, source = registry.local_path(tiny_run["report"]["registry"]["ref"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    shape = ModelConfig(
        vocab_size=len(tokenizer),
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=256,
        tie_embeddings=tie_embeddings,
    )
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id or 0, "eos_token_id": tokenizer.eos_token_id}
    save_hf_model(folder, shape, Transformer(shape).state_dict(), **ids)
    tokenizer.save_pretrained(folder)
    return import_folder(registry, name, folder).ref
