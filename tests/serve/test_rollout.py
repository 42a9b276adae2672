"""Rollout by alias on the session's served app (the lifecycle's): the README's commands
promote a second version (the first quantized to int4 by `rayllm compress`, which the app's
vLLM serves with its int4 kernels; pruned instead on CPUs whose vLLM has no int4 kernel) and
roll the app onto it, then roll it back, each under a
steady stream of requests. No request fails (the client does not retry), and the answers switch
from one version's to the other's. Whatever fails, the test leaves the app serving the version it
found, for the tests after it. A redeploy of an app keeps the replicas of its deployments whose
version holds: a rollout replaces the moved models' replicas alone."""

import os
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from ray import serve

from rayllm.client import Client
from rayllm.registry.store import Registry
from rayllm.serve.node_cpus import local_cpus
from tests.conftest import API_KEYS, overrides, replica_actors
from tests.test_cli import rayllm_ok
from tests.test_readme import block_with, commands

pytestmark = pytest.mark.slow

MODEL = "tiny-shakespeare"
PROMPT = "KING.\n"
KEY = API_KEYS.split(",")[0]
GREEDY = {"max_tokens": 8, "temperature": 0, "logprobs": 1, "ignore_eos": True}
"""What tells weights apart: the log-probabilities of the tokens chosen. The text of a model
this small may be the same few tokens from both versions, int4 rounding or not."""
SAME = 0.005
"""Two answers come from the same weights when no token's log-probability differs by more."""


def same_weights(one: list[float], other: list[float]) -> bool:
    return max(abs(a - b) for a, b in zip(one, other, strict=True)) <= SAME


def publish_compressed(root: str, parent: str, data: str, env: dict) -> str:
    """``parent`` quantized to int4 per channel (``rayllm compress``), published as the
    model's next version: the same tokenizer, other weights, and vLLM's int4 kernels to serve
    it. Round-to-nearest per channel is the coarsest int4, so the answers move the most. Where
    vLLM's CPU build has no int4 kernel (x86 without AVX-512), half of each layer's weights
    pruned instead."""
    settings = {"source": parent, "name": MODEL, "data": data, "registry": root, "eval_rows": 8}
    if local_cpus().has_int4_kernel:
        settings |= {"quantize.algorithm": "rtn", "quantize.group_size": None}
    else:
        settings |= {"method": "prune", "prune.sparsity": 0.5}
    rayllm_ok("compress", *overrides(settings), env=env)
    version = Registry(root).resolve(MODEL)
    assert version.lineage["parent"] == parent
    assert version.lineage["compression"]["method"] == settings.get("method", "quantize")
    return version.ref


class Stream:
    """One client sending the same greedy completion every 0.2 s, without retries (back to
    back, it would take the CPU the new replicas start on); each answer is its tokens'
    log-probabilities."""

    def __init__(self, url: str):
        self.url = url
        self.answers: list[list[float]] = []
        self.failures: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=f"{self.url}/v1", headers=headers, timeout=120) as http:
            while not self.stopped.is_set():
                self.ask(http)
                self.stopped.wait(0.2)

    def ask(self, http: httpx.Client) -> list[float] | None:
        try:
            answer = http.post("/completions", json={"model": MODEL, "prompt": PROMPT} | GREEDY)
        except httpx.TransportError as error:
            self.failures.append(repr(error))
            return None
        if answer.status_code != 200:
            self.failures.append(f"{answer.status_code}: {answer.text[:300]}")
            return None
        self.answers.append(answer.json()["choices"][0]["logprobs"]["token_logprobs"])
        return self.answers[-1]

    def of(self, *versions: list[float]) -> bool:
        """Every answer came from one of ``versions``' weights."""
        return all(any(same_weights(a, v) for v in versions) for a in self.answers)


@contextmanager
def steady_stream(url: str):
    stream = Stream(url)
    thread = threading.Thread(target=stream.run, daemon=True)
    thread.start()
    try:
        yield stream
        time.sleep(3)  # answers from after the rollout
    finally:
        stream.stopped.set()
        thread.join(timeout=150)


def test_a_promoted_version_rolls_out_and_back_with_no_failed_request(
    tiny_run, ray_cluster, tmp_path
):
    root = tiny_run["settings"]["registry"]["root"]
    url = tiny_run["report"]["serve"]["url"]
    first = tiny_run["report"]["registry"]["ref"]
    env = os.environ | ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"]}
    env |= {"RAYLLM_REGISTRY": root, "COLUMNS": "200"}
    second = publish_compressed(root, first, str(tiny_run["workdir"] / "data"), env)
    rayllm_ok("registry", "promote", first, "production", env=env)
    promote, follow, rollback, rollout = commands(block_with("rayllm serve rollout"))
    promote, follow, rollback, rollout = (
        [arg.replace("shakespeare", MODEL).replace(":2", f":{second.split(':')[1]}") for arg in a]
        for a in (promote, follow, rollback, rollout)
    )
    with Client(url, MODEL) as client:
        assert client.versions()[MODEL] == first
    with httpx.Client(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {KEY}"}) as http:
        old_answer = Stream(url).ask(http)

    try:
        with steady_stream(url) as stream:
            rayllm_ok(*promote, env=env)
            moved = rayllm_ok(*follow, env=env)
        assert f"{MODEL}: {first} -> {second} (follows {MODEL}@production)" in moved
        assert not stream.failures, stream.failures
        new_answer = stream.answers[-1]
        assert not same_weights(new_answer, old_answer)  # the new weights answer now
        assert stream.of(old_answer, new_answer), stream.answers
        assert same_weights(stream.answers[0], old_answer)
        with Client(url, MODEL) as client:
            assert client.versions()[MODEL] == second

        with steady_stream(url) as stream:
            rayllm_ok(*rollback, env=env)
            moved = rayllm_ok(*rollout, env=env)
        assert f"{MODEL}: {second} -> {first}" in moved
        assert not stream.failures, stream.failures
        assert same_weights(stream.answers[-1], old_answer)
        assert stream.of(old_answer, new_answer), stream.answers
        with Client(url, MODEL) as client:
            assert client.versions()[MODEL] == first
        assert "already serves what its references name" in rayllm_ok(*rollout, env=env)
    except BaseException:  # the tests after this one expect the first version
        rayllm_ok("registry", "promote", first, "production", env=env)
        rayllm_ok(*rollout, env=env)
        raise


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Weights:
    """A model's deployment, as far as a redeploy sees it: its settings, and what it serves."""

    def __init__(self, ref: str):
        self.ref = ref

    def __call__(self) -> str:
        return self.ref


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Front:
    def __init__(self, models: dict):
        self.models = models

    async def __call__(self, request) -> dict[str, str]:
        return {name: await handle.remote() for name, handle in self.models.items()}


def test_a_redeploy_replaces_only_the_deployments_whose_version_changed(ray_cluster, serve_port):
    """What a rollout of a several-model app relies on (each model's deployment versioned by
    its LLMConfig, tests/serve/test_config.py): ``serve.run`` of the app again keeps the
    replicas of a deployment whose version holds, and the new front end reaches them. Two
    small deployments stand in for the models' vLLM replicas: only their versions matter."""
    from ray.serve.llm import LLMConfig

    from rayllm.serve.ingress import versioned

    def app(refs: dict[str, str]):
        models = {}
        for name, ref in refs.items():
            config = LLMConfig(model_loading_config={"model_id": name, "model_source": ref})
            models[name] = versioned(Weights.options(name=f"Weights:{name}").bind(ref), config)
        return Front.bind(models)

    def live(deployment: str) -> set[str]:
        return set(replica_actors("versioned", deployment))

    deployments = ("Front", "Weights:one", "Weights:two")
    url = f"http://127.0.0.1:{serve_port}/versioned"
    serve.run(app({"one": "one:1", "two": "two:1"}), name="versioned", route_prefix="/versioned")
    try:
        before = {d: live(d) for d in deployments}
        serve.run(
            app({"one": "one:1", "two": "two:2"}), name="versioned", route_prefix="/versioned"
        )
        deadline = time.time() + 60  # the replaced replicas stop (the front end drains 5 s)
        while any(len(live(d)) > 1 for d in deployments):
            assert time.time() < deadline, {d: live(d) for d in deployments}
            time.sleep(0.5)
        after = {d: live(d) for d in deployments}
        assert after["Weights:one"] == before["Weights:one"]  # kept
        assert after["Weights:two"].isdisjoint(before["Weights:two"])  # moved: replaced
        assert after["Front"].isdisjoint(before["Front"])  # no version: replaced every time
        assert httpx.get(url, timeout=60).json() == {"one": "one:1", "two": "two:2"}
    finally:
        serve.delete("versioned")
