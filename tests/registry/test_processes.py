"""The registry under real concurrent and crashing publisher processes."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from rayllm.registry.store import Registry


def _publish_many(root: str, folder: str, count: int) -> list[int]:
    registry = Registry(root)
    return [
        registry.publish("shared", folder, lineage={"pid": os.getpid()}).version
        for _ in range(count)
    ]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3')['bucket']}/registry-{uuid.uuid4().hex}"
    return str(tmp_path / "registry")


def _promote(root: str, version: int, count: int) -> list[int | None]:
    registry = Registry(root)
    return [
        registry.set_alias("shared", "production", version, reason=f"{os.getpid()}")
        for _ in range(count)
    ]


def test_concurrent_publishers_never_share_a_version(tmp_path, root):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.starmap(_publish_many, [(root, str(folder), 3)] * 4)
    numbers = sorted(n for result in results for n in result)
    assert len(set(numbers)) == 12
    registry = Registry(root)
    assert registry.versions("shared") == numbers
    for number in numbers:
        version = registry.resolve(f"shared:{number}")
        registry.verify(version)
        assert version.manifest["version"] == number


def test_killed_publish_leaves_no_visible_version(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for index in range(400):
        (folder / f"shard-{index:04d}.bin").write_bytes(os.urandom(256 * 1024))
    root = tmp_path / "registry"
    script = textwrap.dedent(
        f"""
        from rayllm.registry.store import Registry
        Registry({str(root)!r}).publish("big", {str(folder)!r}, lineage={{}})
        """
    )
    publisher = subprocess.Popen([sys.executable, "-c", script])
    version_dir = root / "big" / "versions" / "1"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(version_dir.glob("shard-*"))) < 20:
        time.sleep(0.01)
    publisher.send_signal(signal.SIGKILL)
    publisher.wait()
    assert 20 <= len(list(version_dir.glob("shard-*"))) < 400, "the kill should land mid-publish"
    registry = Registry(str(root))
    assert registry.versions("big") == []
    assert registry.gc(older_than_s=0) == ["big:1"]
    again = registry.publish("big", folder, lineage={})
    assert registry.versions("big") == [again.version]
    registry.verify(again)


def test_concurrent_promotes_lose_no_update(tmp_path, root):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    registry = Registry(root)
    for _ in range(2):
        registry.publish("shared", folder, lineage={})
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        pool.starmap(_promote, [(root, 1 + i % 2, 3) for i in range(4)])
    history = registry.alias_state("shared")["history"]
    assert len(history) == 12  # every move recorded, none overwritten by another
    assert [h["from"] for h in history[1:]] == [h["to"] for h in history[:-1]]
    assert registry.aliases("shared")["production"] == history[-1]["to"]
