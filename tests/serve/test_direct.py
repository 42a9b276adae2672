"""``ingress: direct`` on the session cluster (which runs Serve's HAProxy mode): the session's
model served with no ingress deployment, each replica answering the OpenAI routes with vLLM's
own server behind rayllm's key check. Same answers as rayllm's ingress app, the OpenAI SDK
unchanged, keys checked in the replica, bad requests answered 4xx, the pinned config there
for ``rayllm serve rollout``, and neither a lost replica nor a rollout under load fails a
request."""

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from rayllm.client import Client, EndpointError
from rayllm.errors import RayllmError
from rayllm.serve.app import (
    DIRECT_INGRESS_CLUSTER,
    HAPROXY_MODE,
    check_haproxy_mode,
    key_digest,
    model_deployment,
    running_config,
)
from rayllm.serve.config import ServeConfig
from tests.conftest import (
    API_KEYS,
    BIN,
    overrides,
    publish_random_model,
    replica_actors,
    replica_states,
    stored_serve_apps,
)
from tests.serve.test_app import BAD_REQUESTS, send_bad_request
from tests.serve.test_rollout import Stream, same_weights, steady_stream
from tests.test_cli import rayllm_ok
from tests.test_readme import block_with, wait_for_text

pytestmark = pytest.mark.slow

MODEL = "tiny-shakespeare"
KEY = API_KEYS.split(",")[0]
GREEDY = {"max_tokens": 8, "temperature": 0, "logprobs": 1, "ignore_eos": True}
WIZARD = {"role": "wizard", "content": "hi"}
"""A role OpenAI's API does not have: vLLM's server would pass it to the chat template."""


@pytest.fixture(scope="module")
def direct(tiny_run, ray_cluster, serve_port, tmp_path_factory):
    """The README's ``rayllm serve ... --set ingress=direct`` line on the session cluster
    (which, like the README's, runs Serve in HAProxy mode), the session's model on two
    replicas behind a key."""
    folder = tmp_path_factory.mktemp("direct")
    (folder / "keys").write_text(f"{KEY}\n")
    line = block_with("--set ingress=direct").strip().splitlines()[-1]
    words = shlex.split(line)
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "COLUMNS": "200"}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env |= {name: value}
    assert words[:2] == ["rayllm", "serve"], line
    assert {name: env[name] for name in DIRECT_INGRESS_CLUSTER} == DIRECT_INGRESS_CLUSTER, line
    settings = {
        "registry": tiny_run["settings"]["registry"]["root"],
        "model": tiny_run["report"]["registry"]["ref"],
        "app_name": "direct",
        "route_prefix": "/direct",
        "port": serve_port,
        "api_keys_file": "keys",
        "min_replicas": 2,
        "max_replicas": 2,
        "max_num_seqs": 4,
    }
    log = folder / "serve.log"  # a file, not a pipe: the replica's logs must never block it
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(BIN / "rayllm"), *words[1:], *overrides(settings)],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_text(server, log, f"as {MODEL} at", timeout_s=400)
        yield f"http://127.0.0.1:{serve_port}/direct"
    finally:
        server.terminate()  # as `ray job stop` or a pod's shutdown: the app is removed
        assert server.wait(timeout=180) == 0, log.read_text()[-3000:]  # after the drain (conftest)


def _complete(url: str, prompt: str) -> list[float]:
    body = {"model": MODEL, "prompt": prompt} | GREEDY
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["logprobs"]["token_logprobs"]


def test_the_replica_answers_as_the_ingress_app_does(direct, tiny_run):
    ingress_app = tiny_run["report"]["serve"]["url"]
    for prompt in ("KING.\n", "ROMEO.\n"):
        ours, theirs = _complete(direct, prompt), _complete(ingress_app, prompt)
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-3


def test_the_openai_sdk_streams_a_chat_with_the_key(direct):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{direct}/v1", api_key=KEY)
    assert [model.id for model in sdk.models.list()] == [MODEL]
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Speak."}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6


def test_the_model_listing_names_the_registry_version(direct, tiny_run):
    version = tiny_run["report"]["registry"]["ref"]
    with Client(direct, MODEL, api_key=KEY) as client:
        assert client.versions() == {MODEL: version}
    card = httpx.get(f"{direct}/v1/models/{MODEL}", headers={"Authorization": f"Bearer {KEY}"})
    assert card.status_code == 200 and card.json()["metadata"]["registry_version"] == version


def test_the_replica_checks_the_key_before_anything_else(direct):
    body = {"model": MODEL, "prompt": "KING.", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        answer = httpx.post(f"{direct}/v1/completions", json=body, headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(("route", "body"), BAD_REQUESTS)
def test_a_bad_request_gets_a_4xx_from_the_replica(direct, route, body):
    answer = send_bad_request(f"{direct}{route}", body, MODEL, {"Authorization": f"Bearer {KEY}"})
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert "error" in answer.json() or "detail" in answer.json()


def test_a_chat_message_in_an_unknown_role_is_refused_as_the_ingress_refuses_it(direct):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}, WIZARD]}
    answer = httpx.post(
        f"{direct}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"].startswith("messages[1].role is 'wizard'; use one of")


def test_the_replica_still_answers_after_the_bad_requests(direct):
    assert len(_complete(direct, "KING.\n")) == GREEDY["max_tokens"]


def test_status_and_rollout_read_the_pinned_config_from_the_replica(direct, ray_cluster):
    config = running_config("direct")  # what `rayllm serve rollout --app direct` starts from
    assert config.ingress == "direct"
    assert [entry.version for entry in config.models] == [f"{MODEL}:1"]
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"]}
    (app,) = json.loads(rayllm_ok("serve", "status", "--app", "direct", "--json", env=env))
    (model,) = app["models"]
    assert app["status"] == "RUNNING" and model["version"] == f"{MODEL}:1", app
    assert model["replicas"] == {"RUNNING": 2}, model


def test_a_replica_lost_under_load_is_replaced_and_fails_no_request(direct, caplog):
    """One of the two replicas killed (its process, as on a lost machine) while four clients
    send completions back to back through rayllm's client, which retries a dropped connection
    and 429 / 502-504 but not a 500: HAProxy sends the requests the dead replica had not
    answered to the other (``RAY_SERVE_HAPROXY_RETRY_ON``, set on the session cluster as the
    README says; without it some come back as HAProxy's 500), and Serve starts a replacement.
    No request fails while the app runs on one replica, nor once the replacement serves."""
    before, _ = _replicas()
    with busy_clients(direct, 4) as clients:
        time.sleep(3)  # every client has a request in flight
        os.kill(before[0].pid, signal.SIGKILL)
        deadline = time.time() + 300
        while True:  # until Serve counts the replacement and the one left as its two replicas
            actors, states = _replicas()
            started = {a.actor_id for a in actors} - {a.actor_id for a in before}
            if started and states == {"RUNNING": 2}:
                break
            assert time.time() < deadline, f"the lost replica was not replaced: {states}"
            time.sleep(1)
        answered = clients.answered
        time.sleep(3)  # answers once both serve
    assert not clients.failures, clients.failures
    assert clients.answered > answered > 0
    retried = [r.getMessage() for r in caplog.records if r.name == "rayllm.client"]
    print(f"{clients.answered} answered; retried: {retried}")  # HAProxy's reloads drop a few


def _deployment() -> str:
    """The name of the direct app's model deployment."""
    from ray import serve

    return model_deployment(serve.status().applications["direct"].deployments, MODEL)


def _replicas() -> tuple[list, dict[str, int]]:
    """The model's live replica actors, and its replicas by state as Serve counts them."""
    name = _deployment()
    return list(replica_actors("direct", name).values()), replica_states("direct", name)


class BusyClients:
    """Clients each sending a 48-token completion as soon as the last is answered, through
    rayllm's client, counting answers and failures."""

    def __init__(self, url: str):
        self.url, self.answered, self.failures = url, 0, []
        self.stopped = threading.Event()

    def run(self) -> None:
        with Client(self.url, MODEL, api_key=KEY, timeout=120) as client:
            while not self.stopped.is_set():
                try:
                    client.complete("KING.\n", max_tokens=48, ignore_eos=True)
                    self.answered += 1
                except EndpointError as error:
                    self.failures.append(str(error))


@contextmanager
def busy_clients(url: str, count: int):
    clients = BusyClients(url)
    threads = [threading.Thread(target=clients.run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield clients
    finally:
        clients.stopped.set()
        for thread in threads:
            thread.join(timeout=150)


def test_a_rollout_under_a_steady_stream_fails_no_request(direct, tiny_run, ray_cluster, tmp_path):
    """The README's ``rayllm serve rollout`` onto another version while a client sends
    requests without retrying: the new replicas start beside the old ones, HAProxy moves to
    them, and the old ones drain and stop. The app's request router is replaced too, its new
    replica started before the old one stops. No request fails; the answers switch to the new
    weights. The stream runs until the old replicas are gone, through the whole drain."""
    deployments = stored_serve_apps(ray_cluster).json()["applications"]["direct"]["deployments"]
    surges = {name: d["deployment_config"]["max_surge_percent"] for name, d in deployments.items()}
    assert surges == {_deployment(): 100, "LLMRouter": 100}
    routers = replica_actors("direct", "LLMRouter")
    other = publish_random_model(tiny_run, f"{MODEL}-direct", tmp_path / "other")
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "COLUMNS": "200"}
    with httpx.Client(base_url=f"{direct}/v1", headers={"Authorization": f"Bearer {KEY}"}) as http:
        old_answer = Stream(direct).ask(http)

    with steady_stream(direct) as stream:
        moved = rayllm_ok(
            "serve", "rollout", "--app", "direct", "--model", f"{MODEL}={other}", env=env
        )
        deadline = time.time() + 120
        while (states := replica_states("direct", _deployment())) != {"RUNNING": 2}:
            assert time.time() < deadline, f"the old replicas did not stop: {states}"
            time.sleep(1)
    assert f"{MODEL}: {MODEL}:1 -> {other} (follows {other})" in moved, moved
    assert not stream.failures, stream.failures
    assert routers and not set(routers) & set(replica_actors("direct", "LLMRouter"))
    assert same_weights(stream.answers[0], old_answer)
    assert not same_weights(stream.answers[-1], old_answer)  # the new weights answer now
    running = running_config("direct")
    assert running.models[0].version == other
    with Client(direct, MODEL, api_key=KEY) as client:
        assert client.versions() == {MODEL: other}
    # The keys came along (the rollout ran where the app's key file is not): digests only.
    assert running.api_key_digests == [key_digest(KEY)]
    unkeyed = httpx.post(f"{direct}/v1/completions", json={"model": MODEL, "prompt": "KING."})
    assert unkeyed.status_code == 401, unkeyed.text


def test_direct_ingress_is_refused_where_it_cannot_work(monkeypatch):
    with pytest.raises(ValueError, match="ingress=direct serves one model"):
        ServeConfig(ingress="direct", models=["bard", "scribe"])
    with pytest.raises(ValueError, match="ingress=direct serves no LoRA adapters"):
        ServeConfig(ingress="direct", model="bard", max_loras=2)
    monkeypatch.delenv(HAPROXY_MODE)
    with pytest.raises(RayllmError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
        check_haproxy_mode()
