"""The registry on a local root and on fsspec's memory filesystem."""

import json
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


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path):
    if request.param == "local":
        return Registry(str(tmp_path / "registry"))
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
