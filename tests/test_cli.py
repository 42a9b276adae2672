"""User mistakes at the command line: one line naming the problem, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest


def rayllm(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quickstart", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
        (["train", "--set", "data=/no/such/shards"], "no finished token shards"),
        (["config", "nonsense"], "unknown stage 'nonsense'"),
        (["quickstart", "--bogus"], "No such option: --bogus"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, message, tmp_path):
    done = rayllm(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_model_lists_the_registry(tmp_path):
    done = rayllm("serve", "--root", str(tmp_path / "registry"), "--set", "model=nope")
    assert done.returncode == 2
    assert "model 'nope' is not in the registry" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_corpus(tmp_path):
    done = rayllm(
        "data", "--set", f"corpus={tmp_path}/missing/*.txt", "--set", f"output={tmp_path}/out"
    )
    assert done.returncode == 2
    assert "matches no files" in done.stderr
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address(tmp_path):
    done = rayllm(
        "data",
        "--set",
        f"output={tmp_path}/out",
        env={"RAY_ADDRESS": "127.0.0.1:1"},
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in done.stderr
    assert "Traceback" not in done.stderr
