"""Batch inference: the README's ``rayllm batch`` command on the lifecycle's registry version
(on the session's S3 registry and Ray cluster), prompts and chats in, Parquet out."""

import json
import os

import pyarrow.parquet as pq
import pytest

from tests.test_cli import rayllm
from tests.test_readme import block_with, commands


@pytest.mark.slow
def test_prompts_become_completions_in_parquet(tiny_run, ray_cluster, tmp_path):
    base = tiny_run["report"]["registry"]["ref"]
    env = os.environ | ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"]}
    env |= {"RAYLLM_REGISTRY": tiny_run["settings"]["registry"]["root"]}
    prompts = ["ROMEO.\n", "JULIET.\n", "KING.\n"]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    output = tmp_path / "completions"
    ours = {
        "model=shakespeare:1": f"model={base}",
        "input=prompts.jsonl": f"input={source}",
        "output=rayllm-work/completions": f"output={output}",
    }
    [batch] = commands(block_with("rayllm batch"))
    done = rayllm(*(ours.get(a, a) for a in batch), "--set", "max_tokens=6", env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 completions" in done.stdout and base in done.stdout

    rows = pq.read_table(output / "completions").to_pylist()
    assert sorted(row["prompt"] for row in rows) == sorted(prompts)
    assert all(row["version"] == base and 0 < row["output_tokens"] <= 6 for row in rows)
    assert all(row["input_tokens"] > 0 and isinstance(row["completion"], str) for row in rows)
    manifest = json.loads((output / "manifest.json").read_text())
    assert (manifest["rows"], manifest["version"]) == (3, base)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    wrong = rayllm(
        "batch",
        *("--set", f"model={base}", "--set", f"input={bad}", "--set", f"output={tmp_path / 'x'}"),
        env=env,
    )
    assert wrong.returncode == 2 and "give each row a 'prompt'" in wrong.stderr


def test_a_batch_without_its_model_or_input_is_refused_before_ray_starts():
    done = rayllm("batch", "--set", "input=prompts.jsonl")
    assert done.returncode == 2 and "batch.model is not set" in done.stderr
    assert "Traceback" not in done.stderr
