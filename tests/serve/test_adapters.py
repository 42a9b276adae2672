"""LoRA adapters before any engine: publishing one against its base version, what a request
name resolves to (and what is refused, with which status), and the replica's loader."""

import asyncio
import inspect
import json
from pathlib import Path

import pytest
from ray.serve.llm import LLMServer

from rayllm.errors import RayllmError
from rayllm.model.config import ModelConfig
from rayllm.model.hf import save_hf_model
from rayllm.model.model import Transformer
from rayllm.registry.importers import import_folder
from rayllm.registry.store import Registry
from rayllm.serve.adapters import AdapterNames, AdapterRefused
from rayllm.serve.app import llm_config, pin
from rayllm.serve.config import ServeConfig
from rayllm.serve.node_cpus import local_cpus
from rayllm.serve.replica_source import RegistryAdapters
from tests.adapters import random_adapter
from tests.test_cli import rayllm


def tiny_model(folder, dim: int):
    config = ModelConfig(
        vocab_size=128, dim=dim, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16
    )
    save_hf_model(folder, config, Transformer(config).state_dict(), bos_token_id=0, eos_token_id=0)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two bases of different widths, an adapter of each, and a rank-32 adapter."""
    root = tmp_path_factory.mktemp("adapters")
    base, other = tiny_model(root / "base", dim=64), tiny_model(root / "other", dim=128)
    return {
        "base": base,
        "other": other,
        "lora": random_adapter(base, root / "lora"),
        "other-lora": random_adapter(other, root / "other-lora"),
        "wide-lora": random_adapter(base, root / "wide-lora", rank=32),
    }


@pytest.fixture
def registry(folders, tmp_path) -> Registry:
    """``bard:1`` and ``bard:2`` (same weights), ``sonnet:1`` (an adapter of bard:1), and
    ``wide:1`` (a rank-32 adapter of bard:1)."""
    registry = Registry(str(tmp_path / "registry"))
    for _ in range(2):
        registry.publish("bard", folders["base"], lineage={})
    for name, adapter in (("sonnet", "lora"), ("wide", "wide-lora")):
        import_folder(registry, name, folders[adapter], parent="bard:1")
    return registry


def publish(registry: Registry, name: str, folder, *options: str):
    return rayllm("registry", "publish", name, str(folder), *options, "--root", registry.url)


def test_an_adapter_is_published_against_its_pinned_base(registry, folders):
    published = publish(registry, "sonnet", folders["lora"], "--parent", "bard")  # latest: 2
    assert published.returncode == 0 and "published sonnet:2" in published.stdout
    lineage = registry.resolve("sonnet:2").lineage
    assert lineage["parent"] == "bard:2"
    assert lineage["adapter"] == {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
    }
    files = {entry["path"] for entry in registry.resolve("sonnet:2").manifest["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files


def test_an_adapter_without_its_base_is_refused_at_publish(registry, folders):
    published = publish(registry, "verse", folders["lora"])
    assert published.returncode == 2 and "Traceback" not in published.stderr
    assert "is a peft adapter; name the registry version it was trained on" in published.stderr
    assert "verse" not in registry.models()


@pytest.mark.parametrize(
    ("adapter", "parent", "message"),
    [
        ("lora", "sonnet:1", "sonnet:1 is itself an adapter"),
        ("other-lora", "bard:1", "does not fit bard:1's"),
    ],
)
def test_an_adapter_that_cannot_be_served_is_refused_at_publish(
    registry, folders, adapter, parent, message
):
    with pytest.raises(RayllmError, match=message):
        import_folder(registry, "verse", folders[adapter], parent=parent)
    assert "verse" not in registry.models()


def names(registry: Registry, **settings) -> AdapterNames:
    config = pin(ServeConfig(registry=registry.url, model="bard@serving", **settings))
    return AdapterNames(config)


def test_request_names_are_pinned_to_one_servable_version(registry):
    registry.set_alias("bard", "serving", 1)
    registry.set_alias("sonnet", "production", 1)
    served = names(registry, max_loras=2)
    for name in ("bard:sonnet", "bard:sonnet:1", "bard:sonnet@production"):
        assert asyncio.run(served.pinned(name)) == "bard:sonnet:1"
    assert asyncio.run(served.pinned("bard")) == "bard"
    assert asyncio.run(served.listed()) == {"bard:sonnet": "sonnet:1"}
    assert asyncio.run(names(registry, max_loras=2, max_lora_rank=32).listed()) == {
        "bard:sonnet": "sonnet:1",
        "bard:wide": "wide:1",
    }


@pytest.mark.parametrize(
    ("settings", "name", "status", "message"),
    [
        ({}, "bard:sonnet", 400, "bard serves no adapters; redeploy it with max_loras=1"),
        ({"max_loras": 1}, "bard:poem", 404, "model 'poem' is not in the registry"),
        ({"max_loras": 1}, "bard:bard", 400, "bard:2 is a full model, not an adapter"),
        ({"max_loras": 1}, "bard:wide", 400, "wide:1 has rank 32 and bard accepts ranks up to 16"),
    ],
)
def test_what_the_replicas_cannot_serve_is_refused_with_its_status(
    registry, settings, name, status, message
):
    registry.set_alias("bard", "serving", 1)
    with pytest.raises(AdapterRefused, match=message) as refused:
        asyncio.run(names(registry, **settings).pinned(name))
    assert refused.value.status == status


def test_an_adapter_of_another_base_version_is_refused(registry):
    registry.set_alias("bard", "serving", 2)
    assert asyncio.run(names(registry, max_loras=1).listed()) == {}
    with pytest.raises(
        AdapterRefused, match="sonnet:1 was trained on bard:1 and bard serves bard:2"
    ):
        asyncio.run(names(registry, max_loras=1).pinned("bard:sonnet"))


def test_the_replica_loads_a_pinned_adapter_from_the_registry(registry):
    # Ray 2.60's LLMServer takes the adapter loader rayllm.serve.server passes it.
    assert "model_downloader" in inspect.signature(LLMServer.__init__).parameters
    config = pin(ServeConfig(registry=registry.url, model="bard:1", max_loras=3))
    engine = llm_config(config.models[0], config, has_gpus=False, cpus=local_cpus())
    assert engine.lora_config.max_num_adapters_per_replica == 3
    assert {k: engine.engine_kwargs[k] for k in ("enable_lora", "max_loras", "max_lora_rank")} == {
        "enable_lora": True,
        "max_loras": 3,
        "max_lora_rank": 16,
    }
    loaded = asyncio.run(RegistryAdapters().load_model_from_config("bard:sonnet:1", engine))
    assert loaded.model_id == "bard:sonnet:1"
    adapter_config = json.loads(
        (registry.local_path("sonnet:1")[1] / "adapter_config.json").read_text()
    )
    assert (
        json.loads((Path(loaded.local_path) / "adapter_config.json").read_text()) == adapter_config
    )
