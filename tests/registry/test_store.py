"""The registry on a local root, on fsspec's memory filesystem and on an S3 API."""

import json
import subprocess
import sys
import uuid

import pytest

from rayllm.errors import RayllmError
from rayllm.registry.store import Registry


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture(params=["local", "memory", "s3"])
def registry(request, tmp_path):
    if request.param == "local":
        return Registry(str(tmp_path / "registry"))
    if request.param == "s3":
        bucket = request.getfixturevalue("s3")["bucket"]
        return Registry(f"s3://{bucket}/registry-{uuid.uuid4().hex}")
    return Registry(f"memory://rayllm-{uuid.uuid4().hex}")


def test_publish_resolve_and_alias(registry, model_folder):
    first = registry.publish("tiny", model_folder, lineage={"parent": None})
    second = registry.publish("tiny", model_folder, lineage={"parent": first.ref})
    assert (first.version, second.version) == (1, 2)
    assert registry.resolve("tiny").version == 2
    assert registry.resolve("tiny:1").manifest["lineage"] == {"parent": None}
    registry.set_alias("tiny", "production", 1, reason="first good one")
    assert registry.resolve("tiny@production").version == 1
    assert registry.models() == ["tiny"]
    _, local = registry.local_path("tiny@production")
    assert (local / "model.safetensors").read_bytes() == b"weights" * 100


def test_version_without_manifest_is_invisible(registry, model_folder):
    registry.publish("tiny", model_folder, lineage={})
    registry.fs.makedirs(f"{registry.root}/tiny/versions/2", exist_ok=True)
    registry.fs.pipe(f"{registry.root}/tiny/versions/2/config.json", b"{}")
    assert registry.versions("tiny") == [1]
    assert registry.resolve("tiny").version == 1
    assert registry.publish("tiny", model_folder, lineage={}).version == 3


def test_corruption_is_detected(registry, model_folder):
    version = registry.publish("tiny", model_folder, lineage={})
    registry.fs.pipe(f"{registry.root}/tiny/versions/1/model.safetensors", b"tampered" * 100)
    with pytest.raises(RayllmError, match="model.safetensors"):
        registry.verify(version)
    with pytest.raises(RayllmError, match="checksum"):
        registry.local_path("tiny:1")


def test_unknown_names_list_what_exists(registry, model_folder):
    registry.publish("tiny", model_folder, lineage={})
    with pytest.raises(RayllmError, match=r"'huge' is not in the registry .*models: tiny"):
        registry.resolve("huge")
    with pytest.raises(RayllmError, match=r"no version '7' \(versions: 1\)"):
        registry.resolve("tiny:7")
    with pytest.raises(RayllmError, match="no alias 'prod'"):
        registry.resolve("tiny@prod")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "white space", "x" * 200])
def test_unsafe_names_are_refused(registry, model_folder, name):
    with pytest.raises(RayllmError, match="not allowed"):
        registry.publish(name, model_folder, lineage={})


def test_rollback_and_history(registry, model_folder):
    for _ in range(3):
        registry.publish("tiny", model_folder, lineage={})
    assert registry.set_alias("tiny", "production", 1, reason="launch") is None
    assert registry.set_alias("tiny", "production", 3, reason="better loss") == 1
    assert registry.rollback("tiny", "production") == 1
    assert registry.resolve("tiny@production").version == 1
    history = registry.alias_state("tiny")["history"]
    assert [(h["from"], h["to"]) for h in history] == [(None, 1), (1, 3), (3, 1)]
    assert history[1]["reason"] == "better loss" and history[1]["by"] and history[1]["at"]
    with pytest.raises(RayllmError, match="no earlier target"):
        registry.rollback("tiny", "staging")


def test_lineage_walks_parents(registry, model_folder):
    registry.publish("base", model_folder, lineage={"parent": None, "source": {"kind": "gguf"}})
    registry.publish("chat", model_folder, lineage={"parent": "base:1"})
    registry.publish("chat", model_folder, lineage={"parent": "chat:1"})
    assert [v.ref for v in registry.lineage("chat")] == ["chat:2", "chat:1", "base:1"]
    with pytest.raises(RayllmError, match="'ghost' is not in the registry"):
        registry.publish("chat", model_folder, lineage={"parent": "ghost:1"})


def test_damaged_manifest_names_the_file(registry, model_folder):
    registry.publish("tiny", model_folder, lineage={})
    registry.fs.pipe(f"{registry.root}/tiny/versions/1/manifest.json", b"{not json")
    with pytest.raises(RayllmError, match=r"tiny/versions/1/manifest.json is damaged"):
        registry.resolve("tiny")


def test_export_gives_a_plain_folder(registry, model_folder, tmp_path):
    registry.publish("tiny", model_folder, lineage={})
    registry.export("tiny:1", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    with pytest.raises(RayllmError, match="not empty"):
        registry.export("tiny:1", tmp_path / "out")


def test_gc_removes_only_stale_unpublished_versions(registry, model_folder):
    registry.publish("tiny", model_folder, lineage={})
    leftover = f"{registry.root}/tiny/versions/2"
    registry.fs.makedirs(leftover, exist_ok=True)
    registry.fs.pipe(f"{leftover}/config.json", b"{}")
    assert registry.gc(older_than_s=3600) == []  # too fresh: may be a publish in progress
    assert registry.gc(older_than_s=0) == ["tiny:2"]
    assert not registry.fs.exists(f"{leftover}/config.json")
    assert registry.versions("tiny") == [1]


def test_concurrent_resolutions_share_one_verified_copy(model_folder, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("RAYLLM_CACHE", str(tmp_path / "cache"))
    registry = Registry(f"memory://rayllm-shared-{uuid.uuid4().hex}")
    registry.publish("tiny", model_folder, lineage={})
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: registry.local_path("tiny:1")[1], range(4)))
    assert len(set(paths)) == 1
    assert (paths[0] / ".verified").exists()
    assert (paths[0] / "model.safetensors").read_bytes() == b"weights" * 100
    assert not list(paths[0].parent.glob("*.staging-*"))


def test_storage_mistakes_are_one_clear_line(s3):
    with pytest.raises(RayllmError, match="unknown storage protocol 'nosuch'"):
        Registry("nosuch://bucket/registry")
    with pytest.raises(RayllmError, match="bucket 'no-such-bucket' does not exist"):
        Registry("s3://no-such-bucket/registry")
    # gcsfs is the optional 'gcs' extra, not installed with the test dependencies.
    with pytest.raises(
        RayllmError, match=r"gs:// filesystem is not installed; pip install 'rayllm\[gcs\]'"
    ):
        Registry("gs://bucket/registry")


def test_evaluations_are_recorded_and_gate_promotion(registry, model_folder):
    """Results go into the version's manifest (files still verify); an alias's gate refuses a
    version that misses a threshold or was never scored, unless forced with a reason; a
    rollback is never held up by the gate."""
    first = registry.publish("tiny", model_folder, lineage={"parent": None})
    second = registry.publish("tiny", model_folder, lineage={"parent": first.ref})
    registry.set_alias("tiny", "production", 1)
    registry.set_gate(
        "tiny", "production", {"qa.f1": {"min": 0.3}, "perplexity.perplexity": {"max": 40}}
    )

    with pytest.raises(RayllmError, match="qa.f1 was never measured"):
        registry.set_alias("tiny", "production", 2)
    registry.record_evaluations(second, {"qa": {"f1": 0.25}, "perplexity": {"perplexity": 30.0}})
    stored = registry.resolve("tiny:2").manifest["evaluations"]
    assert stored["qa"]["f1"] == 0.25 and "at" in stored["qa"] and "by" in stored["qa"]
    registry.verify(registry.resolve("tiny:2"))
    with pytest.raises(RayllmError, match=r"qa.f1 0.25 is below 0.3"):
        registry.set_alias("tiny", "production", 2)
    with pytest.raises(RayllmError, match="needs a --reason"):
        registry.set_alias("tiny", "production", 2, forced=True)

    registry.record_evaluations(registry.resolve("tiny:2"), {"qa": {"f1": 0.4}})
    assert registry.resolve("tiny:2").manifest["evaluations"]["perplexity"]["perplexity"] == 30.0
    assert registry.set_alias("tiny", "production", 2) == 1  # passes now
    assert registry.rollback("tiny", "production") == 1  # version 1 was never scored
    registry.set_alias("tiny", "production", 1, reason="hotfix", forced=True)
    history = registry.alias_state("tiny")["history"]
    assert history[-1]["forced"] == [
        "perplexity.perplexity was never measured",
        "qa.f1 was never measured",
    ]
    registry.set_gate("tiny", "production", {})
    assert registry.set_alias("tiny", "production", 2) == 1
    with pytest.raises(RayllmError, match="TASK.SCORE"):
        registry.set_gate("tiny", "production", {"f1": {"min": 0.3}})


def test_a_manifest_another_process_rewrites_is_read_anew(registry, model_folder, tmp_path):
    """Recorded evaluations rewrite a manifest in place; a registry that listed the version
    before (an object store caches what it lists, ETags included) reads the new one."""
    if registry.url.startswith("memory://"):
        pytest.skip("a memory registry is one process's: no other process writes it")
    registry.publish("tiny", model_folder, lineage={"parent": None})
    registry.local_path("tiny:1")
    record = (
        "import sys; from rayllm.registry.store import Registry; r = Registry(sys.argv[1]); "
        "r.record_evaluations(r.resolve('tiny:1'), {'qa': {'f1': 0.5}})"
    )
    subprocess.run([sys.executable, "-c", record, registry.url], check=True, timeout=120)
    assert registry.resolve("tiny:1").manifest["evaluations"]["qa"]["f1"] == 0.5


def test_a_registry_recreated_at_the_same_url_is_not_read_from_the_old_copy(
    model_folder, tmp_path, monkeypatch
):
    """A cached copy is used only while the registry's manifest lists its checksums: a bucket
    recreated under the same URL may hold other files as the same version."""
    monkeypatch.setenv("RAYLLM_CACHE", str(tmp_path / "cache"))
    url = f"memory://rayllm-recreated-{uuid.uuid4().hex}"
    Registry(url).publish("tiny", model_folder, lineage={})
    assert (Registry(url).local_path("tiny:1")[1] / "model.safetensors").read_bytes()[:7] == (
        b"weights"
    )
    Registry(url).fs.rm(Registry(url).root, recursive=True)
    (model_folder / "model.safetensors").write_bytes(b"retrained" * 100)
    Registry(url).publish("tiny", model_folder, lineage={})
    _, local = Registry(url).local_path("tiny:1")
    assert (local / "model.safetensors").read_bytes() == b"retrained" * 100
