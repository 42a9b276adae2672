"""What ``rayllm serve`` builds before Ray is involved: each model's settings, pinned versions,
API keys, and the Serve config file ``--export-config`` writes."""

import json

import pytest
import yaml
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from rayllm.errors import RayllmError
from rayllm.registry.store import Registry
from rayllm.serve.app import (
    IMPORT_PATH,
    api_key_digests,
    key_digest,
    llm_config,
    pin,
    serve_config_file,
)
from rayllm.serve.config import BatchConfig, ModelEntry, ServeConfig
from rayllm.serve.node_cpus import NodeCpus, common, local_cpus
from rayllm.serve.rollout import plan
from tests.test_cli import rayllm


@pytest.fixture
def registry(tmp_path) -> Registry:
    folder = tmp_path / "model"
    folder.mkdir()
    shape = {"num_attention_heads": 6, "num_key_value_heads": 2}
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]} | shape))
    (folder / "model.safetensors").write_bytes(b"weights")
    registry = Registry(str(tmp_path / "registry"))
    for name in ("bard", "bard", "scribe"):
        registry.publish(name, folder, lineage={})
    registry.set_alias("bard", "production", 1)
    return registry


def test_each_model_takes_the_apps_settings_unless_it_gives_its_own():
    config = ServeConfig(
        max_replicas=3,
        kv_cache_gib=2,
        models=["bard@production", {"model": "scribe", "max_replicas": 1, "model_id": "s"}],
    )
    first, second = config.entries()
    assert (first.model, first.max_replicas, first.kv_cache_gib) == ("bard@production", 3, 2)
    assert (second.model_id, second.max_replicas, second.kv_cache_gib) == ("s", 1, 2)


def test_pinning_resolves_aliases_and_names_each_model(registry):
    config = pin(ServeConfig(registry=registry.url, models=["bard@production", "scribe"]))
    assert [(e.model, e.version, e.model_id) for e in config.models] == [
        ("bard@production", "bard:1", "bard"),
        ("scribe", "scribe:1", "scribe"),
    ]
    assert pin(ServeConfig(registry=registry.url, model="bard")).models[0].version == "bard:2"


def test_a_pinned_app_keeps_its_versions_until_a_rollout_resolves_them_again(registry):
    running = pin(ServeConfig(registry=registry.url, models=["bard@production", "scribe"]))
    assert pin(running) == running  # rebuilt (a restart, `serve deploy`): the same versions
    assert not plan("app", running).needed

    registry.set_alias("bard", "production", 2)
    assert pin(running) == running  # a moved alias changes nothing by itself
    rollout = plan("app", running)
    assert rollout.needed and rollout.changes == {"bard": ("bard:1", "bard:2")}
    assert [e.version for e in rollout.config.models] == ["bard:2", "scribe:1"]
    assert rollout.config.models[1] == running.models[1]

    follow = plan("app", running, {"scribe": "bard@production"})  # a model follows a new ref
    assert follow.follows == {"bard": "bard@production", "scribe": "bard@production"}
    assert follow.changes == {"bard": ("bard:1", "bard:2"), "scribe": ("scribe:1", "bard:2")}
    with pytest.raises(RayllmError, match="app 'app' serves no model poet; it serves bard"):
        plan("app", running, {"poet": "bard"})


def test_rollouts_start_replacements_before_stopping_old_replicas(registry):
    config = pin(ServeConfig(registry=registry.url, model="scribe"))
    options = llm_config(
        config.models[0], config, has_gpus=False, cpus=local_cpus()
    ).deployment_config
    assert DeploymentSchema(name="scribe", **options).max_surge_percent == 100  # Serve's option
    with pytest.raises(ValueError, match="max_surge_percent is a percentage"):
        ServeConfig(max_surge_percent=150)


def test_a_models_deployment_keeps_its_version_until_its_config_changes(registry):
    """``serve.run`` of the app again (a rollout) replaces the replicas of a deployment whose
    version changed (tests/serve/test_rollout.py shows Serve keeping the others): each model's
    deployment is versioned by its own settings, so a rollout replaces the moved model's. The
    versions are read from the deployments Serve's builder makes of the app, as ``serve.run``
    sends them; the ingress has none (a new one each time: it holds the pinned config)."""
    from ray.serve._private.build_app import build_app

    from rayllm.serve.ingress import openai_app

    def versions(models: list[str], **settings) -> dict[str, str | None]:
        config = pin(ServeConfig(registry=registry.url, models=models, **settings))
        built = [llm_config(e, config, has_gpus=False, cpus=local_cpus()) for e in config.models]
        app = openai_app(built, [], config.model_dump(mode="json"))
        return {d.name: d.version for d in build_app(app, name="app").deployments}

    served = versions(["bard@production", "scribe"])
    assert served.pop("Ingress") is None
    assert sorted(served) == ["ModelServer:bard", "ModelServer:scribe"] and all(served.values())
    assert versions(["bard@production", "scribe"]) == served | {"Ingress": None}  # again: same
    moved = versions(["bard:2", "scribe"])
    assert moved["ModelServer:scribe"] == served["ModelServer:scribe"]
    assert moved["ModelServer:bard"] != served["ModelServer:bard"]
    resized = versions(["bard@production", "scribe"], max_num_seqs=3)  # every engine's setting
    assert resized["ModelServer:bard"] != served["ModelServer:bard"]
    assert resized["ModelServer:scribe"] != served["ModelServer:scribe"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"models": ["bard:1", "bard:2"]}, "two served models are named 'bard'"),
        ({"models": ["poet"]}, "model 'poet' is not in the registry"),
        ({}, "holds 2 models (bard, scribe); set model="),
    ],
)
def test_pinning_refuses_what_cannot_be_served(registry, settings, message):
    with pytest.raises(RayllmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pin(ServeConfig(registry=registry.url, **settings))


def test_a_tensor_parallel_replica_reserves_a_bundle_per_rank(registry):
    """On GPUs, a GPU per rank, where Ray places the engine's rank actors; on CPUs, the ranks
    are processes of the replica's node (vLLM's multiprocess executor): all bundles there,
    each rank's threads from its own bundle, the replica's KV cache split over the ranks
    (tests/serve/test_app.py shows the ranks' processes)."""
    settings = {"model": "scribe", "tensor_parallel_size": 2, "cpus_per_replica": 3}
    config = pin(ServeConfig(registry=registry.url, kv_cache_gib=1, **settings))
    on_gpus = llm_config(config.models[0], config, has_gpus=True, cpus=local_cpus())
    assert on_gpus.placement_group_config == {
        "bundles": [{"CPU": 3.0, "GPU": 1}] * 2,
        "strategy": "PACK",
    }
    assert on_gpus.engine_kwargs["tensor_parallel_size"] == 2
    on_cpus = llm_config(config.models[0], config, has_gpus=False, cpus=local_cpus())
    assert on_cpus.placement_group_config == {
        "bundles": [{"CPU": 3.0}] * 2,
        "strategy": "STRICT_PACK",
    }
    assert on_cpus.engine_kwargs["tensor_parallel_size"] == 2
    assert on_cpus.engine_kwargs["kv_cache_memory_bytes"] == 2**29
    assert on_cpus.runtime_env["env_vars"]["OMP_NUM_THREADS"] == "2"


def test_ranks_that_cannot_split_the_heads_are_refused_before_a_replica_starts(registry):
    """6 attention heads and 2 KV heads: 2 and 6 ranks split both (6 copying each KV head to
    3 ranks); 4 splits neither, 3 the KV heads not."""
    for ranks in (4, 3):
        config = pin(ServeConfig(registry=registry.url, model="scribe", tensor_parallel_size=ranks))
        with pytest.raises(RayllmError, match=rf"size {ranks} cannot split .* one of \[1, 2, 6\]"):
            llm_config(config.models[0], config, has_gpus=True, cpus=local_cpus())


def test_a_batch_engine_on_cpus_is_one_rank(registry, tmp_path):
    """Refused before the output or the input is touched."""
    from rayllm.serve.batch import run

    settings = {"registry": registry.url, "model": "scribe", "input": str(tmp_path / "x.jsonl")}
    config = BatchConfig(**settings, output=str(tmp_path / "out"), use_gpu=False)
    with pytest.raises(RayllmError, match="batch.tensor_parallel_size 2 needs GPUs"):
        run(config.model_copy(update={"tensor_parallel_size": 2}))
    assert not (tmp_path / "out").exists()


def test_a_replica_takes_its_cpus_and_a_cpu_engine_computes_with_them(registry):
    """One bundle of ``cpus_per_replica`` CPUs, which the replica actor shares with its engine
    (ray.serve.llm adds the actor's own ``num_cpus`` to it), and a thread on each whole CPU
    but one for a CPU engine. The session's served replica shows the placement group Serve
    makes of it (tests/serve/test_engine.py)."""
    config = pin(ServeConfig(registry=registry.url, model="scribe", cpus_per_replica=4.5))
    for on_gpu, bundle, threads in (
        (False, {"CPU": 4.5}, "3"),
        (True, {"CPU": 4.5, "GPU": 1}, None),
    ):
        replica = llm_config(config.models[0], config, has_gpus=on_gpu, cpus=local_cpus())
        assert replica.placement_group_config["bundles"] == [bundle]
        assert replica.deployment_config["ray_actor_options"] == {"num_cpus": 0}
        assert replica.runtime_env["env_vars"].get("OMP_NUM_THREADS") == threads
    with pytest.raises(ValueError, match="cpus_per_replica must be above 0"):
        ServeConfig(cpus_per_replica=0)
    with pytest.raises(ValueError, match="cpus_per_engine above 0"):
        BatchConfig(cpus_per_engine=0)


def test_replicas_ask_for_the_custom_resources_of_their_nodes(registry):
    settings = {"registry": registry.url, "model": "scribe", "replica_resources": {"serving": 1}}
    config = pin(ServeConfig(**settings))
    bundles = llm_config(
        config.models[0], config, has_gpus=False, cpus=local_cpus()
    ).placement_group_config["bundles"]
    assert bundles == [{"CPU": 1.0, "serving": 1}]
    for wrong in ({"CPU": 2}, {"serving": 0}):
        with pytest.raises(ValueError, match="replica_resources names custom resources"):
            ServeConfig(**settings | {"replica_resources": wrong})


def test_api_keys_come_from_a_file_and_the_environment(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nalpha\n\n beta \n")
    monkeypatch.setenv("TEST_KEYS", "gamma, alpha")
    config = ServeConfig(api_keys_file=str(keys), api_keys_env="TEST_KEYS")
    assert api_key_digests(config) == sorted(key_digest(k) for k in ("alpha", "beta", "gamma"))
    assert api_key_digests(ServeConfig()) == []  # open by default

    with pytest.raises(RayllmError, match="does not exist"):
        api_key_digests(ServeConfig(api_keys_file=str(tmp_path / "nothing")))
    with pytest.raises(RayllmError, match=r"\$UNSET_KEYS, which is not set"):
        api_key_digests(ServeConfig(api_keys_env="UNSET_KEYS"))
    monkeypatch.setenv("TEST_KEYS", " , ")
    with pytest.raises(RayllmError, match="none was found"):
        api_key_digests(ServeConfig(api_keys_env="TEST_KEYS"))


def test_key_digests_are_sha256_hex():
    digests = [key_digest("alpha")]
    assert ServeConfig(api_key_digests=digests).api_key_digests == digests
    for wrong in (["alpha"], [key_digest("alpha").upper()], [key_digest("alpha")[:-1]]):
        with pytest.raises(ValueError, match="64 lowercase hex digits"):
            ServeConfig(api_key_digests=wrong)


def test_the_exported_file_is_a_serve_config_with_every_model_pinned(registry):
    config = ServeConfig(registry=registry.url, models=["bard@production", "scribe"], port=8100)
    exported = serve_config_file(config)
    ServeDeploySchema.model_validate(exported)  # what `serve deploy` checks first
    (app,) = exported["applications"]
    assert app["import_path"] == IMPORT_PATH
    assert exported["http_options"]["port"] == 8100
    rebuilt = ServeConfig.model_validate(app["args"])
    entries = [ModelEntry.model_validate(m) for m in rebuilt.models]
    assert [(e.model, e.version) for e in entries] == [
        ("bard@production", "bard:1"),
        ("scribe", "scribe:1"),
    ]
    assert pin(rebuilt) == pin(config)  # deploying the file builds the same app


def test_the_cli_exports_without_starting_ray(registry, tmp_path):
    target = tmp_path / "serve.yaml"
    done = rayllm(
        "serve", "--set", f"registry={registry.url}", "--set", "model=bard@production",
        "--export-config", str(target),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    exported = yaml.safe_load(target.read_text())
    (entry,) = exported["applications"][0]["args"]["models"]
    assert (entry["model"], entry["version"]) == ("bard@production", "bard:1")
    done = rayllm("serve", "--set", f"registry={registry.url}", "--export-config", "-")
    assert done.returncode == 2
    assert "holds 2 models" in done.stderr and "Traceback" not in done.stderr


def test_memory_settings_reach_the_engine_where_the_platform_has_them(registry):
    config = pin(ServeConfig(registry=registry.url, model="scribe", kv_cache_gib=0.25))
    on_cpu = llm_config(config.models[0], config, has_gpus=False, cpus=local_cpus()).engine_kwargs
    assert on_cpu["kv_cache_memory_bytes"] == 2**28 and on_cpu["enable_prefix_caching"] is True
    offloading = config.model_copy(update={"kv_offload_gib": 8, "weight_offload_gib": 2})
    offloading = pin(offloading.model_copy(update={"models": [], "model": "scribe"}))
    on_gpu = llm_config(
        offloading.models[0], offloading, has_gpus=True, cpus=local_cpus()
    ).engine_kwargs
    assert (on_gpu["kv_offloading_size"], on_gpu["cpu_offload_gb"]) == (8, 2)
    assert "kv_cache_memory_bytes" not in on_gpu  # GPUs: gpu_memory_utilization sizes it
    with pytest.raises(RayllmError, match="kv_offload_gib offloads GPU memory to the CPU"):
        llm_config(offloading.models[0], offloading, has_gpus=False, cpus=local_cpus())
    with pytest.raises(ValueError, match="kv_cache_gib must be above 0"):
        ServeConfig(kv_cache_gib=0)


def test_auto_dtype_is_bfloat16_only_where_every_node_for_a_replica_computes_it(registry):
    config = pin(ServeConfig(registry=registry.url, model="scribe"))
    amx = NodeCpus(frozenset({"avx512f", "amx_bf16"}), frozenset({"x86_64"}))
    avx2 = NodeCpus(frozenset({"avx2"}), frozenset({"x86_64"}))

    def dtype(cpus: NodeCpus, **settings) -> str:
        entry = config.models[0].model_copy(update=settings)
        return llm_config(entry, config, has_gpus=False, cpus=cpus).engine_kwargs["dtype"]

    assert (dtype(amx), dtype(common([amx, avx2])), dtype(avx2)) == ("bfloat16", *["float32"] * 2)
    assert dtype(avx2, dtype="bfloat16") == "bfloat16"  # the user's setting is kept
