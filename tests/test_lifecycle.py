"""The user story of the quickstart, at reduced size: raw text in, served completions out.

Real Ray Data, Ray Train with DeepSpeed ZeRO-2 on 2 workers, the registry, Ray Serve with the
vLLM engine, and HTTP through rayllm's client and the openai SDK.
"""

import json
import math

import pytest
import torch

from rayllm.client import Client
from rayllm.registry.store import Registry

pytestmark = pytest.mark.slow


def test_completions_come_back_from_the_served_model(tiny_run):
    completions = tiny_run["report"]["completions"]
    assert len(completions) == 2
    assert all(c["completion"].strip() for c in completions)


def test_every_stage_reports_its_figures(tiny_run):
    report = tiny_run["report"]
    data = report["data"]
    assert data["documents_in"] == 6000
    assert 0 < data["documents_kept"] < data["documents_in"]
    assert sum(data["dropped"].values()) + data["exact_duplicates"] + data["documents_kept"] == 6000
    assert report["train"]["step"] == 12 and report["train"]["tokens_per_s"] > 0
    assert report["train"]["loss"] < math.log(1024)  # better than uniform over the vocabulary
    assert 1 < report["eval"]["perplexity"] < 1024


def test_published_version_has_lineage_and_loads_in_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = Registry(str(tiny_run["workdir"] / "registry"))
    version, folder = registry.local_path("tiny-shakespeare")
    lineage = version.manifest["lineage"]
    assert lineage["data"]["manifest_sha256"]
    assert lineage["training"]["parallel"] == {
        "strategy": "zero",
        "zero_stage": 2,
        "offload_optimizer": False,
    }
    assert lineage["metrics"]["perplexity"] == pytest.approx(
        tiny_run["report"]["eval"]["perplexity"]
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("ROMEO.\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    shards = json.loads((tiny_run["workdir"] / "data" / "manifest.json").read_text())
    assert shards["vocab_size"] == len(tokenizer)


def test_openai_sdk_and_streaming_against_the_endpoint(tiny_run):
    from openai import OpenAI

    endpoint = tiny_run["report"]["serve"]
    sdk = OpenAI(base_url=f"{endpoint['url']}/v1", api_key="unused")
    reply = sdk.completions.create(
        model="tiny-shakespeare", prompt="KING.\n", max_tokens=8, temperature=0
    )
    assert reply.choices[0].text
    with Client(endpoint["url"], "tiny-shakespeare") as client:
        assert client.models() == ["tiny-shakespeare"]
        pieces = list(client.stream("KING.\n", max_tokens=8, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == reply.choices[0].text
