"""The user story of the lifecycle, at reduced size: raw text in, served completions out.

Submitted with ``ray job submit`` to a ``ray start --head`` cluster as the README says: real
Ray Data, Ray Train with DeepSpeed ZeRO-2 on 2 workers, the registry on an S3 API, Ray Serve
with the vLLM engine resolving the version on its replica, and HTTP through rayllm's client
and the openai SDK.
"""

import hashlib
import json
import math
import re

import pytest
import torch

from rayllm.client import Client
from rayllm.paths import cache_dir
from rayllm.registry.store import Registry

pytestmark = pytest.mark.slow


def test_the_job_prints_generated_text(tiny_run):
    completions = tiny_run["report"]["completions"]
    assert len(completions) == 2
    assert all(c["completion"].strip() for c in completions)
    # The console shows the generated text (control characters a tiny model may emit aside).
    longest_word = max(re.findall(r"[A-Za-z]+", completions[1]["completion"]) or [""], key=len)
    assert "JULIET." in tiny_run["job_output"]
    assert longest_word in tiny_run["job_output"]
    assert tiny_run["report"]["chat"]["assistant"].strip()
    assert "rayllm lifecycle" in tiny_run["job_output"]  # the report table


def test_every_stage_reports_its_figures(tiny_run):
    report = tiny_run["report"]
    data = report["data"]
    assert data["documents_in"] == 6000
    assert 0 < data["documents_kept"] < data["documents_in"]
    assert sum(data["dropped"].values()) + data["exact_duplicates"] + data["documents_kept"] == 6000
    assert report["train"]["step"] == 12 and report["train"]["tokens_per_s"] > 0
    assert report["train"]["loss"] < math.log(1024)  # better than uniform over the vocabulary
    assert 1 < report["eval"]["perplexity"] < 1024
    assert report["registry"]["root"] == "s3://rayllm-test/registry"
    assert report["serve"]["models"] == {"tiny-shakespeare": report["registry"]["ref"]}
    assert report["registry"]["ref"] == "tiny-shakespeare:1"


def test_the_replica_resolved_the_version_from_object_storage(tiny_run):
    key = hashlib.sha256(b"s3://rayllm-test/registry").hexdigest()[:12]
    copy = cache_dir() / "registry" / key / "tiny-shakespeare" / "1"
    assert (copy / ".verified").exists() and (copy / "tokenizer.json").exists()


def test_published_version_is_a_complete_hugging_face_model(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = Registry("s3://rayllm-test/registry")
    version, folder = registry.local_path(tiny_run["report"]["registry"]["ref"])
    lineage = version.manifest["lineage"]
    shards = (tiny_run["workdir"] / "data" / "manifest.json").read_bytes()
    assert lineage["data"]["manifest_sha256"] == hashlib.sha256(shards).hexdigest()
    assert lineage["training"]["parallel"]["strategy"] == "zero"
    assert lineage["training"]["parallel"]["zero_stage"] == 2
    assert lineage["metrics"]["perplexity"] == pytest.approx(
        tiny_run["report"]["eval"]["perplexity"]
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who art thou?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\nWho art thou?<|endoftext|>\n<|assistant|>\n"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert json.loads(shards)["vocab_size"] == len(tokenizer)


def test_openai_sdk_completions_chat_and_streaming(tiny_run):
    from openai import OpenAI

    endpoint = tiny_run["report"]["serve"]
    sdk = OpenAI(base_url=f"{endpoint['url']}/v1", api_key="unused")
    reply = sdk.completions.create(
        model="tiny-shakespeare", prompt="KING.\n", max_tokens=8, temperature=0
    )
    assert reply.choices[0].text
    chat = sdk.chat.completions.create(
        model="tiny-shakespeare",
        messages=[{"role": "user", "content": "Speak."}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.content
    with Client(endpoint["url"], "tiny-shakespeare") as client:
        assert client.models()[0] == "tiny-shakespeare"  # then the adapters tests published
        assert client.versions()["tiny-shakespeare"] == "tiny-shakespeare:1"
        pieces = list(client.stream("KING.\n", max_tokens=8, temperature=0))
        same_chat = client.chat([{"role": "user", "content": "Speak."}], 8, temperature=0)
    assert len(pieces) > 1
    assert "".join(pieces) == reply.choices[0].text
    assert same_chat == chat.choices[0].message.content
