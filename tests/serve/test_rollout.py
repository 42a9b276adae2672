"""Rollout by alias on the session's served app (the lifecycle's): the README's commands
promote a second version (the first quantized to int4 by `rayllm compress`, which the app's
vLLM serves with its int4 kernels) and roll the app onto it, then roll it back, each under a
steady stream of requests. No request fails (the client does not retry), and the answers switch
from one version's to the other's."""

import os
import threading
import time
from contextlib import contextmanager

import pytest

from rayllm.client import Client, EndpointError, Retry
from rayllm.registry.store import Registry
from tests.conftest import overrides
from tests.test_cli import rayllm_ok
from tests.test_readme import block_with, commands

pytestmark = pytest.mark.slow

MODEL = "tiny-shakespeare"
PROMPT = "KING.\n"
SAMPLING = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
"""Seeded sampling: the same text from the same weights, another from other weights (greedy
decoding of a model this small repeats one token, whatever the noise on its weights)."""


def publish_quantized(root: str, parent: str, data: str, env: dict) -> str:
    """``parent`` quantized to int4 by GPTQ (``rayllm compress``), published as the model's
    next version: the same tokenizer, other weights, and vLLM's int4 kernels to serve it."""
    settings = {"source": parent, "name": MODEL, "data": data, "registry": root}
    settings |= {"quantize.group_size": 64, "calibration_rows": 16, "eval_rows": 8}
    rayllm_ok("compress", *overrides(settings), env=env)
    version = Registry(root).resolve(MODEL)
    assert version.lineage["parent"] == parent and "quantization" in version.lineage["compression"]
    return version.ref


class Stream:
    """One client sending the same seeded completion every 0.2 s, without retries (back to
    back, it would take the CPU the new replicas start on)."""

    def __init__(self, url: str):
        self.url = url
        self.answers: list[str] = []
        self.failures: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        with Client(self.url, MODEL, retry=Retry(attempts=1), timeout=120) as client:
            while not self.stopped.is_set():
                try:
                    self.answers.append(client.complete(PROMPT, **SAMPLING))
                except EndpointError as error:
                    self.failures.append(str(error))
                self.stopped.wait(0.2)


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
    second = publish_quantized(root, first, str(tiny_run["workdir"] / "data"), env)
    rayllm_ok("registry", "promote", first, "production", env=env)
    promote, follow, rollback, rollout = commands(block_with("rayllm serve rollout"))
    promote, follow, rollback, rollout = (
        [arg.replace("shakespeare", MODEL).replace(":2", f":{second.split(':')[1]}") for arg in a]
        for a in (promote, follow, rollback, rollout)
    )
    with Client(url, MODEL) as client:
        assert client.versions()[MODEL] == first
        old_answer = client.complete(PROMPT, **SAMPLING)

    with steady_stream(url) as stream:
        rayllm_ok(*promote, env=env)
        moved = rayllm_ok(*follow, env=env)
    assert f"{MODEL}: {first} -> {second} (follows {MODEL}@production)" in moved
    assert not stream.failures, stream.failures
    new_answer = stream.answers[-1]
    assert new_answer != old_answer  # the new weights answer now
    assert set(stream.answers) == {old_answer, new_answer}, stream.answers
    with Client(url, MODEL) as client:
        assert client.versions()[MODEL] == second

    with steady_stream(url) as stream:
        rayllm_ok(*rollback, env=env)
        moved = rayllm_ok(*rollout, env=env)
    assert f"{MODEL}: {second} -> {first}" in moved
    assert not stream.failures, stream.failures
    assert stream.answers[-1] == old_answer
    assert set(stream.answers) == {old_answer, new_answer}, stream.answers
    with Client(url, MODEL) as client:
        assert client.versions()[MODEL] == first
    assert "already serves what its references name" in rayllm_ok(*rollout, env=env)
