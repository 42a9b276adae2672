"""Pins what rayllm relies on in Ray 2.60's ``ray.serve.llm`` callback hook (an internal base
class, behind ``rayllm.serve.replica_source``): the hook runs before the engine starts, can
point the engine at a local folder and can skip Ray's own model download."""

import asyncio
import inspect
import json

from ray.llm._internal.common.callbacks.base import CallbackBase, CallbackCtx

from rayllm.registry.store import Registry
from rayllm.serve.app import llm_config, pin
from rayllm.serve.config import ServeConfig
from rayllm.serve.node_cpus import local_cpus
from rayllm.serve.replica_source import RegistrySource


def test_the_hook_rayllm_uses_exists_as_expected():
    assert issubclass(RegistrySource, CallbackBase)
    assert inspect.iscoroutinefunction(CallbackBase.on_before_node_init)
    assert CallbackCtx().run_init_node is True


def test_the_replica_resolves_the_pinned_version_and_skips_rays_download(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"weights")
    registry = Registry(str(tmp_path / "registry"))
    registry.publish("tiny", folder, lineage={})

    app = pin(ServeConfig(registry=registry.url))
    config = llm_config(app.models[0], app, has_gpus=False, cpus=local_cpus())
    assert config.callback_config.callback_class is RegistrySource
    assert config.callback_config.callback_kwargs == {"root": registry.url, "ref": "tiny:1"}
    assert config.model_loading_config.model_source == "tiny:1"  # no driver-side path

    hook = RegistrySource(llm_config=config, **config.callback_config.callback_kwargs)
    asyncio.run(hook.on_before_node_init())
    expected = registry.local_path("tiny:1")[1]
    assert config.get_engine_config().actual_hf_model_id == str(expected)
    assert hook.ctx.run_init_node is False
