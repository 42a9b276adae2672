"""LoRA adapters on the session's served app (the lifecycle's, served with max_loras=2): the
README's commands publish two random adapters of the served version, and requests pick each
by name, one at a time and in one batch, through the official SDK and rayllm's CLI; an
adapter's first requests, sent at once, are all answered."""

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
import yaml

from rayllm.registry.store import Registry
from tests.adapters import random_adapter
from tests.conftest import API_KEYS
from tests.test_cli import rayllm_ok
from tests.test_readme import block_with, commands

pytestmark = pytest.mark.slow

MODEL = "tiny-shakespeare"
KEY = API_KEYS.split(",")[0]
LOGPROBS = {"max_tokens": 4, "temperature": 0, "logprobs": 1, "extra_body": {"ignore_eos": True}}
"""What tells weights apart: the log-probabilities of the tokens chosen (the text of a model
this small and this briefly trained is the same few tokens, whatever an adapter adds)."""


@ray.remote(num_cpus=0)
def ask_through_the_handle(model: str) -> dict:
    from rayllm.client import EndpointError, HandleClient

    answers = {"text": HandleClient(model).complete("KING.\n", 4, 0, ignore_eos=True)}
    try:
        HandleClient(f"{model}-c")
    except EndpointError as error:
        answers["unknown"] = (str(error), error.status)
    return answers


def test_adapters_are_picked_per_request_on_the_base_models_replicas(
    tiny_run, ray_cluster, tmp_path
):
    root = tiny_run["settings"]["registry"]["root"]
    url = tiny_run["report"]["serve"]["url"]
    base = tiny_run["report"]["registry"]["ref"]
    env = os.environ | ray_cluster["env"] | {"RAYLLM_REGISTRY": root, "COLUMNS": "200"}
    publish, serve, chat = commands(block_with("rayllm registry publish shakespeare-lora"))
    _, base_folder = Registry(root).local_path(base)
    for name, seed in ((f"{MODEL}-lora", 0), (f"{MODEL}-lora-b", 1)):
        folder = random_adapter(base_folder, tmp_path / name, seed=seed)
        ours = {"shakespeare-lora": name, "./adapter": str(folder), "shakespeare:1": base}
        published = rayllm_ok(*(ours.get(a, a) for a in publish), env=env)
        assert f"published {name}:1" in published

    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)

    def complete(model: str) -> openai.types.Completion:
        return sdk.completions.create(model=model, prompt="KING.\n", **LOGPROBS)

    def logprobs(answer: openai.types.Completion) -> list[float]:
        return answer.choices[0].logprobs.token_logprobs

    def differ(one: list[float], other: list[float]) -> bool:
        return max(abs(a - b) for a, b in zip(one, other, strict=True)) > 0.01

    base_answer, lora = complete(MODEL), complete(f"{MODEL}:{MODEL}-lora")
    assert lora.model == f"{MODEL}:{MODEL}-lora:1"  # the name, pinned to the version answering
    assert differ(logprobs(lora), logprobs(base_answer))
    again = complete(f"{MODEL}:{MODEL}-lora:1")
    assert logprobs(again) == pytest.approx(logprobs(lora), abs=1e-4)

    # The second adapter's first requests come at once (no retries): the replica loads it once
    # for all of them, and every one is answered.
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": f"{MODEL}:{MODEL}-lora-b", "prompt": "KING.\n", "max_tokens": 2}
    with ThreadPoolExecutor(4) as pool:
        burst = list(
            pool.map(
                lambda _: httpx.post(
                    f"{url}/v1/completions", headers=headers, json=body, timeout=120
                ),
                range(4),
            )
        )
    assert [answer.status_code for answer in burst] == [200] * 4, [a.text[:300] for a in burst]
    other = complete(f"{MODEL}:{MODEL}-lora-b")
    alone = [logprobs(answer)[0] for answer in (base_answer, lora, other)]
    with ThreadPoolExecutor(3) as pool:  # one batch: the base and two adapters
        batch = list(
            pool.map(complete, [MODEL, f"{MODEL}:{MODEL}-lora", f"{MODEL}:{MODEL}-lora-b"])
        )
    # Each request of the batch is answered by its own weights (without rayllm's
    # cpu_lora_ops, vLLM's CPU ops would give the base request the last adapter's): its first
    # token's log-probability (which depends on the prompt alone) is nearest the one its model
    # gave alone. Batched numerics differ from single ones in the last digits, and later greedy
    # picks may part at a near-tie.
    for number, answer in enumerate(batch):
        first = logprobs(answer)[0]
        nearest = min(range(3), key=lambda n: abs(alone[n] - first))
        assert nearest == number, (number, first, alone)
    assert differ(logprobs(other), logprobs(lora)) and differ(
        logprobs(other), logprobs(base_answer)
    )

    handled = ray.get(ask_through_the_handle.remote(f"{MODEL}:{MODEL}-lora"), timeout=300)
    assert handled["text"] == lora.choices[0].text
    message, status = handled["unknown"]
    assert status == 404 and f"model '{MODEL}-lora-c' is not in the registry" in message

    listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    versions = {card["id"]: card["metadata"]["registry_version"] for card in listed["data"]}
    expected = {
        MODEL: base,
        f"{MODEL}:{MODEL}-lora": f"{MODEL}-lora:1",
        f"{MODEL}:{MODEL}-lora-b": f"{MODEL}-lora-b:1",
    }
    assert versions.items() >= expected.items()  # the fine-tuning tests publish more adapters
    assert all(name == MODEL or name.startswith(f"{MODEL}:") for name in versions)

    chat = [a.replace("shakespeare:shakespeare-lora", f"{MODEL}:{MODEL}-lora") for a in chat]
    said = rayllm_ok(*chat, "--url", url, "--max-tokens", "6", env=env | {"RAYLLM_API_KEY": KEY})
    assert said.strip()

    with pytest.raises(
        openai.NotFoundError, match=f"model '{MODEL}-lora-c' is not in the registry"
    ):
        complete(f"{MODEL}:{MODEL}-lora-c")
    # The model's own name is its latest version (the rollout test publishes another).
    with pytest.raises(
        openai.BadRequestError, match=rf"{MODEL}:\d+ is a full model, not an adapter"
    ):
        complete(f"{MODEL}:{MODEL}")

    # The README's serve line, as the Serve config it deploys.
    serve = [a.replace("shakespeare:1", base) for a in serve]
    exported = tmp_path / "app.yaml"
    rayllm_ok(*serve, "--export-config", str(exported), env=env)
    args = yaml.safe_load(exported.read_text())["applications"][0]["args"]
    assert args["max_loras"] == 4 and args["models"][0]["version"] == base
