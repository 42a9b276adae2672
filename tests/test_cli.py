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


def rayllm_ok(*args: str, env: dict | None = None, timeout: int = 600) -> str:
    """``rayllm ARGS``, which must succeed: its stdout (and its output when it fails)."""
    done = rayllm(*args, env=env, timeout=timeout)
    assert done.returncode == 0, f"rayllm {' '.join(args)}\n{done.stdout}{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lifecycle", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
        (["lifecycle", "--set", "train.data=/x"], "train.data is '/x' but the lifecycle trains"),
        (["train", "--set", "warmup_steps=500"], "warmup_steps (500) must be"),
        (["data", "--set", "output=nosuch://b/out"], "unknown storage protocol 'nosuch'"),
        (["train", "--set", "data=/no/such/shards"], "no finished token shards"),
        (
            ["eval", "--set", "model=bard", "--set", "data=/no/such/shards"],
            "no finished token shards",
        ),
        (
            ["train", "--set", "parallel.strategy=fsdp", "--set", "parallel.tp=3"],
            "num_workers (2) is not a multiple of parallel.tp x parallel.pp (3 x 1)",
        ),
        (["train", "--set", "parallel.pp=2"], "DeepSpeed ZeRO runs without tensor or pipeline"),
        (["train", "--set", "precision=fp16"], "precision fp16 needs GPUs"),
        (["bench", "train", "--data", "/no/such/shards"], "no finished token shards"),
        (["bench", "train", "--set", "dimm=1024"], "unknown config key 'dimm' in --set"),
        (["bench", "train", "--set", "n_heads=7"], "dim 512 is not a multiple of n_heads 7"),
        (["bench", "train", "--strategy", "tp"], "--strategy tp is not a strategy"),
        (["bench", "data", "--setting", "nope"], "unknown MinHash setting 'nope'"),
        (["serve", "--set", "models=[a, b]", "--set", "model=a"], "set either model"),
        (["serve", "rollout", "--model", "bard"], "--model takes MODEL_ID=REFERENCE"),
        (["serve", "--set", "port=1", "rollout"], "belong to `rayllm serve` itself"),
        (["config", "nonsense"], "unknown stage 'nonsense'"),
        (["lifecycle", "--bogus"], "No such option: --bogus"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, message, tmp_path):
    done = rayllm(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_model_lists_the_registry(tmp_path):
    done = rayllm("serve", "--set", f"registry={tmp_path / 'registry'}", "--set", "model=nope")
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


def test_an_output_rayllm_did_not_write_is_kept(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    done = rayllm("data", "--set", f"output={precious}")
    assert done.returncode == 2
    assert "was not written by rayllm" in done.stderr and "overwrite=true" in done.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_a_bucket_that_does_not_exist(s3, tmp_path):
    done = rayllm("registry", "list", "--root", "s3://no-such-bucket/registry")
    assert done.returncode == 2
    assert "bucket 'no-such-bucket' does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_readme_benchmark_command_parses():
    """The README's benchmark commands (minutes each: benchmarks, which the suite does not run)
    name known commands and options, with values of their types and known ``--variant``
    settings."""
    import re

    import typer

    from rayllm.bench.serve import parse_variant
    from rayllm.cli import app
    from tests.test_readme import README, commands

    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [c for b in blocks for c in commands(b.replace("\\\n", " ")) if c[0] == "bench"]
    assert len(lines) >= 7, lines
    for args in lines:
        command, rest, parent = typer.main.get_command(app), list(args), None
        while hasattr(command, "resolve_command"):  # a group of commands
            parent = command.context_class(command, info_name=command.name, parent=parent)
            name, command, rest = command.resolve_command(parent, rest)
        parsed = command.make_context(name, rest, parent=parent)  # a bad option raises
        for text in parsed.params.get("variant") or []:
            parse_variant(text)
