"""The README's commands, run as written (at reduced size) against the session's Ray cluster.

The command lines are read from the README itself, so a renamed flag or verb fails here. Each
stage command gets size overrides appended (fewer documents, a tiny model, a free port); the
commands run in a scratch folder, so ``rayllm-work/`` and ``./out`` land there.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, overrides

pytestmark = pytest.mark.slow

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
RAYLLM = str(Path(sys.executable).parent / "rayllm")

REDUCED = {
    "data": {
        "max_documents": 300,
        "tokenizer": {"vocab_size": 512},
        "seq_len": 64,
        "val_fraction": 0.05,
        "workers": 1,
    },
    "train": {
        "steps": 4,
        "micro_batch_size": 2,
        "cpus_per_worker": 0.5,
        "log_every": 2,
        "eval_every": 4,
        "checkpoint_every": 4,
        "eval_batches": 1,
        "model": TINY_MODEL,
    },
    "serve": {
        "max_replicas": 1,
        "max_num_seqs": 4,
        "app_name": "readme",
        "route_prefix": "/readme",
    },
}


def block_after(marker: str, language: str = "bash") -> str:
    """The first ```language block after ``marker`` in the README."""
    rest = README[README.index(marker) :]
    return re.search(rf"```{language}\n(.*?)```", rest, re.S).group(1)


def block_with(text: str, language: str = "bash") -> str:
    """The ```language block of the README that holds ``text``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", README, re.S)
    return next(block for block in blocks if text in block)


def commands(block: str) -> list[list[str]]:
    """The ``rayllm ...`` lines of a block, comments stripped, as argument lists."""
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("rayllm ")]


@pytest.fixture(scope="module")
def scratch(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "COLUMNS": "200"}
    env.pop("RAYLLM_REGISTRY", None)
    return folder, env


def run(args: list[str], folder: Path, env: dict, timeout: int = 600):
    done = subprocess.run(
        [RAYLLM, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"rayllm {shlex.join(args)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    return done


def test_the_stages_one_at_a_time(scratch, serve_port):
    folder, env = scratch
    port = serve_port
    steps = commands(block_after("The stages one at a time"))
    verbs = [args[0] for args in steps]
    assert verbs == ["data", "train", "registry", "eval", "serve", "complete", "chat"]
    data, train, publish, evaluate, serve, complete, chat = steps

    run(data + overrides(REDUCED["data"]), folder, env)
    assert (folder / "rayllm-work" / "data" / "manifest.json").exists()
    run(train + overrides(REDUCED["train"]), folder, env)
    assert (folder / "rayllm-work" / "model" / "tokenizer.json").exists()
    run(publish, folder, env)

    # The evaluation runs while the app starts: both read the published version alone.
    serve = [a.replace("port=8000", f"port={port}") for a in serve] + overrides(REDUCED["serve"])
    log = folder / "serve.log"  # a file, not a pipe: nothing reads it while the evaluation runs
    with log.open("w") as out:
        server = subprocess.Popen(
            [RAYLLM, *serve],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        scored = run(evaluate, folder, env).stdout
        assert "bible:1: held-out perplexity" in scored, scored
        wait_for_text(server, log, "serving bible:1 as bible at", timeout_s=400)
        url = f"http://127.0.0.1:{port}/readme"
        for args in (complete, chat):
            args = [url if a == "http://127.0.0.1:8000" else a for a in args]
            answer = run([*args, "--max-tokens", "8"], folder, env)
            assert answer.stdout.strip()
        _python_snippet(url, folder, env)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: the app is removed
        assert server.wait(timeout=120) == 0


def wait_for_text(process: subprocess.Popen, log: Path, text: str, timeout_s: float) -> None:
    """Until ``process`` has written ``text`` to ``log``; fails if it exits or times out first."""
    deadline = time.time() + timeout_s
    while text not in log.read_text():
        if process.poll() is not None or time.time() > deadline:
            raise AssertionError(f"no {text!r} from rayllm serve:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _python_snippet(url: str, folder: Path, env: dict) -> None:
    """The README's Python client snippets (blocking, then asyncio) against the served model."""
    for code in (block_after("From Python", "python"), block_with("AsyncClient", "python")):
        code = code.replace("http://127.0.0.1:8000", url).replace(
            'model="shakespeare"', 'model="bible"'
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip()


def test_the_registry_commands(scratch):
    """The registry block, on the model the stage commands trained (published as
    ``shakespeare`` twice first, so that the block's versions exist). The GGUF import of the
    built-in SmolLM2 is left to tests/registry/test_models.py."""
    folder, env = scratch
    env = env | {"RAYLLM_REGISTRY": str(folder / "registry-block")}
    model = folder / "rayllm-work" / "model"
    if not model.exists():
        pytest.skip("needs the model test_the_stages_one_at_a_time trains")
    (folder / "hf-folder").symlink_to(model)
    for _ in range(2):
        run(["registry", "publish", "shakespeare", str(model)], folder, env)
    for args in commands(block_with("rayllm registry import mymodel")):
        if "smollm2" in args:
            continue
        run(args, folder, env, timeout=120)
    assert (folder / "out" / "model.safetensors").exists()


def test_the_quick_start_make_targets_run_the_commands_the_suite_tests():
    """`make quickstart` is `rayllm lifecycle` (tests/test_lifecycle.py runs it as a Ray job)
    and `make test` is ruff and this suite, each after the install script (a dry run of make:
    what each target would execute)."""
    lines = [line.split("#")[0].strip() for line in block_after("## Quick start").splitlines()]
    assert lines == ["make quickstart", "make test"]
    # The suite runs under `make test`; make's own variables would make this a nested make,
    # and `make test ARGS=...` exports ARGS to the suite.
    outside_make = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "ARGS")
    }
    planned = {
        target: [
            line.strip()
            for line in subprocess.run(
                ["make", "-n", "--no-print-directory", target],
                cwd=Path(__file__).parent.parent,
                env=outside_make,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()
        ]
        for target in ("quickstart", "test")
    }
    assert planned["quickstart"] == ["bash cluster/install.sh .venv", ".venv/bin/rayllm lifecycle"]
    assert planned["test"][0] == "bash cluster/install.sh .venv"
    assert any("-m pytest" in line for line in planned["test"])
