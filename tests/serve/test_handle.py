"""Calls from inside the cluster: a Ray task asks the session's served model through its
DeploymentHandle and gets what the HTTP route answers."""

import subprocess
import sys

import pytest
import ray

from rayllm.client import Client
from tests.test_readme import block_with

pytestmark = pytest.mark.slow

MODEL = "tiny-shakespeare"


@ray.remote(num_cpus=0)
def ask_through_the_handle() -> dict:
    from rayllm.client import EndpointError, HandleClient

    client = HandleClient(MODEL)
    answers = {
        "text": client.complete("KING.\n", max_tokens=6, temperature=0),
        "chat": client.chat([{"role": "user", "content": "Speak."}], max_tokens=4),
    }
    try:
        client.complete("KING.\n", max_tokens=10**9)
    except EndpointError as error:
        answers["refused"] = str(error)
    try:
        HandleClient("nobody")
    except EndpointError as error:
        answers["unknown"] = str(error)
    return answers


def test_a_ray_task_gets_the_http_answer_through_the_deployment_handle(tiny_run, ray_cluster):
    answers = ray.get(ask_through_the_handle.remote(), timeout=300)
    with Client(tiny_run["report"]["serve"]["url"], MODEL) as client:
        assert answers["text"] == client.complete("KING.\n", max_tokens=6, temperature=0)
    assert isinstance(answers["chat"], str)
    assert "refused the call" in answers["refused"]
    assert answers["unknown"] == "Serve app 'rayllm' serves no model 'nobody'"


def test_the_readme_snippet_runs_on_the_cluster(tiny_run, ray_cluster):
    code = block_with("HandleClient(", "python").replace('"shakespeare"', f'"{MODEL}"')
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"]}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
