"""The served app on the session cluster.

- Two models in one app behind API keys, deployed the way a cluster deploys it: ``serve
  deploy`` of the ``serveConfigV2`` of the RayService ``rayllm k8s render`` made of the file
  ``rayllm serve --export-config`` wrote.
- Bad requests get OpenAI-style 4xx answers, never a 5xx, and the replica keeps serving.
"""

import asyncio
import json
import shlex
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from rayllm.client import AsyncClient, Client, EndpointError
from tests.conftest import API_KEYS, BIN, engine_processes, replica_actors, stored_serve_apps
from tests.test_cli import rayllm_ok
from tests.test_readme import block_with

pytestmark = pytest.mark.slow

KEY = API_KEYS.split(",")[0]


@pytest.fixture(scope="module")
def keyed_app(tiny_run, ray_cluster, serve_port, tmp_path_factory):
    """The README's two-model app behind API keys, at reduced size (the session's S3 registry
    and tiny model, one replica per model), as a KubeRay RayService carries it: exported with
    ``rayllm serve --export-config``, rendered by ``rayllm k8s render`` into a RayService (valid
    against its CRD, pods reading S3 credentials from a Secret), whose ``serveConfigV2`` is
    deployed with ``serve deploy`` and queried with ``rayllm chat``, as the README says. The
    file listens on 0.0.0.0:8000 as a pod must; Serve, already running on this cluster, keeps
    the session's address and says so."""
    from ray import serve

    from tests.test_k8s import validate

    folder = tmp_path_factory.mktemp("keyed")
    recipe = yaml.safe_load(block_with("api_keys_env:", "yaml"))
    first, second = recipe["models"]
    assert first == "shakespeare" and second["model_id"] == "bible-small"
    recipe |= {
        "registry": tiny_run["settings"]["registry"]["root"],
        "models": [
            "tiny-shakespeare:1",
            second | {"model": "tiny-shakespeare:1", "max_replicas": 1, "tensor_parallel_size": 2},
        ],
        "max_replicas": 1,
        "max_num_seqs": 4,
        "kv_cache_gib": 1,
        "host": "0.0.0.0",
        "app_name": "keyed",
        "route_prefix": "/keyed",
    }
    (folder / "serve.yaml").write_text(yaml.safe_dump(recipe))
    url = f"http://127.0.0.1:{serve_port}/keyed"
    env = ray_cluster["env"] | {"RAY_DASHBOARD_ADDRESS": ray_cluster["dashboard"]}
    lines = [line for line in block_with("serve deploy serve-app.yaml").splitlines()]
    export, deploy, chat = (shlex.split(line) for line in lines if not line.startswith("export"))
    _run(export, folder, env)
    exported = folder / "serve-app.yaml"
    k8s = folder / "k8s"
    rayllm_ok(
        "k8s", "render", "--out", str(k8s), "--set", f"serve_app={exported}",
        "--set", "object_storage_secret=rayllm-s3",
    )  # fmt: skip
    service = yaml.safe_load((k8s / "rayservice.yaml").read_text())
    validate(service)
    assert service["spec"]["serveConfigV2"] == exported.read_text()
    (folder / "rayservice-app.yaml").write_text(service["spec"]["serveConfigV2"])
    _run([arg.replace("serve-app.yaml", "rayservice-app.yaml") for arg in deploy], folder, env)
    deadline = time.time() + 600
    while (
        status := serve.status().applications.get("keyed")
    ) is None or status.status != "RUNNING":
        assert time.time() < deadline, status
        assert status is None or status.status != "DEPLOY_FAILED", status.message
        time.sleep(2)
    reply = _run([*chat, "--url", url, "--max-tokens", "6"], folder, env)
    assert reply.stdout.strip()
    yield {"url": url, "exported": exported}
    (replica,) = replica_actors("keyed", "ModelServer:bible-small").values()
    ranks, _ = engine_processes(replica, "VLLM::Worker_TP")
    serve.delete("keyed")  # its replicas' CPU goes back to the rest of the session
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"tensor-parallel ranks {alive} outlived their deleted replica"


def _run(line: list[str], folder: Path, env: dict) -> subprocess.CompletedProcess:
    """A README command line: leading VAR=value words go to the environment."""
    while "=" in line[0]:
        name, value = line.pop(0).split("=", 1)
        env = env | {name: value}
    done = subprocess.run(
        [str(BIN / line[0]), *line[1:]], cwd=folder, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{shlex.join(line)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def test_requests_without_a_known_key_get_an_openai_style_401(keyed_app):
    body = {"model": "bible-small", "prompt": "KING.", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        answer = httpx.post(f"{keyed_app['url']}/v1/completions", json=body, headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.headers["www-authenticate"] == "Bearer"
    with pytest.raises(EndpointError, match="answered 401.*RAYLLM_API_KEY") as error:
        Client(keyed_app["url"], "bible-small", api_key="wrong").models()
    assert error.value.status == 401


def test_one_app_serves_both_models_from_the_same_weights(keyed_app):
    """bible-small's replica splits the model over two tensor-parallel ranks, processes of
    its CPU engine beside the engine core, each computing with the thread of its 1-CPU bundle
    and bound to no core (this host has one NUMA node, where vLLM's binding fails), and
    answers as the one-rank replica does."""
    (replica,) = replica_actors("keyed", "ModelServer:bible-small").values()
    engines, lines = engine_processes(replica)
    assert len(engines) == 1, lines
    ranks, _ = engine_processes(replica, "VLLM::Worker_TP")
    assert len(ranks) == 2, lines
    for rank in ranks:
        env = rank.environ()
        assert (env["OMP_NUM_THREADS"], env["VLLM_CPU_OMP_THREADS_BIND"]) == ("1", "nobind")
    with Client(keyed_app["url"], "tiny-shakespeare", api_key=KEY) as bard:
        assert bard.versions() == {
            "tiny-shakespeare": "tiny-shakespeare:1",
            "bible-small": "tiny-shakespeare:1",
        }
        text = bard.complete("KING.\n", max_tokens=8, temperature=0)
    with Client(keyed_app["url"], "bible-small", api_key=KEY) as other:
        assert other.complete("KING.\n", max_tokens=8, temperature=0) == text  # one version


def test_the_openai_sdk_and_the_async_client_use_the_key(keyed_app):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{keyed_app['url']}/v1", api_key=KEY)
    chat = sdk.chat.completions.create(
        model="bible-small", messages=[{"role": "user", "content": "Speak."}], max_tokens=6
    )
    assert chat.choices[0].message.content

    async def many() -> list[str]:
        async with AsyncClient(keyed_app["url"], "tiny-shakespeare", api_key=KEY) as client:
            prompts = [f"ACT {n}.\n" for n in range(6)]
            return await asyncio.gather(*(client.complete(p, max_tokens=4) for p in prompts))

    assert all(asyncio.run(many()))


def test_the_keys_reach_neither_the_logs_nor_the_stored_config(keyed_app, ray_cluster):
    assert KEY not in keyed_app["exported"].read_text()
    stored = stored_serve_apps(ray_cluster)
    assert "keyed" in stored.text and KEY not in stored.text
    logs = Path(ray_cluster["temp_dir"]) / "session_latest" / "logs"
    leaked = [path for path in logs.rglob("*") if path.is_file() and KEY in _text(path)]
    assert not leaked, leaked


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


LONG = "KING. " * 400  # far past the tiny model's context
BAD_REQUESTS = [  # (a request without "model" is not among them: one served model answers it)
    # (route, JSON body with "M" for the served model, or (raw body, content type))
    ("/v1/completions", "not json"),
    ("/v1/completions", ""),
    ("/v1/completions", "[1, 2]"),
    ("/v1/completions", {}),
    ("/v1/completions", {"model": "M"}),
    ("/v1/completions", {"model": "M", "prompt": None}),
    ("/v1/completions", {"model": "M", "prompt": 123}),
    ("/v1/completions", {"model": "M", "prompt": LONG}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "max_tokens": -1}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "max_tokens": 10**9}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "max_tokens": "ten"}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "temperature": -1}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "temperature": "hot"}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "top_p": 2}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "top_p": -0.5}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "n": 0}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "stop": 123}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "seed": "abc"}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "presence_penalty": 9}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "logit_bias": {"x": 1}}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "stream": "maybe"}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "stream_options": "yes"}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "logprobs": 100}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "top_k": -5}),
    ("/v1/completions", {"model": "M", "prompt": "KING.", "frequency_penalty": "x"}),
    ("/v1/completions", {"model": "M", "prompt": []}),
    ("/v1/completions", {"model": "no-such-model", "prompt": "KING."}),
    ("/v1/completions", ('{"model": "tiny-shakespeare", "prompt": "KING."}', "text/plain")),
    (
        "/v1/completions",
        ("model=tiny-shakespeare&prompt=KING.", "application/x-www-form-urlencoded"),
    ),
    ("/v1/chat/completions", {"model": "M"}),
    ("/v1/chat/completions", {"model": "M", "messages": []}),
    ("/v1/chat/completions", {"model": "M", "messages": "hello"}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"content": "hi"}]}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": LONG}]}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user"}], "max_tokens": -5}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}),
    (
        "/v1/chat/completions",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": -1},
    ),
]


def send_bad_request(url: str, body, model: str, headers: dict | None = None) -> httpx.Response:
    """POST one of BAD_REQUESTS to ``url``, its "M" standing for ``model``."""
    body, content_type = body if isinstance(body, tuple) else (body, "application/json")
    if isinstance(body, dict):
        body = json.dumps({k: model if v == "M" else v for k, v in body.items()})
    headers = {"Content-Type": content_type} | (headers or {})
    return httpx.post(url, content=body, headers=headers, timeout=60)


@pytest.mark.parametrize(("route", "body"), BAD_REQUESTS)
def test_a_bad_request_gets_an_openai_error_and_no_5xx(tiny_run, route, body):
    url = tiny_run["report"]["serve"]["url"]
    answer = send_bad_request(f"{url}{route}", body, "tiny-shakespeare")
    assert 400 <= answer.status_code < 500, answer.text
    message = answer.json()["error"]["message"]
    assert message and "Internal exception" not in message, message  # vLLM's words only


def test_the_endpoint_still_answers_after_the_bad_requests(tiny_run, ray_cluster):
    endpoint = tiny_run["report"]["serve"]
    with Client(endpoint["url"], "tiny-shakespeare") as client:
        assert client.complete("KING.\n", max_tokens=4)
    # ...and the ingress logged no traceback for them (Ray's middleware logs one per error).
    logs = Path(ray_cluster["temp_dir"]) / "session_latest" / "logs" / "serve"
    ingress = list(logs.glob("replica_rayllm_Ingress_*.log"))
    assert ingress and not [p for p in ingress if "Encountered failure" in _text(p)], ingress
