"""Every recipe and cluster config in the repository loads through the code that reads it:
job recipes through ``rayllm config``, the cluster launcher config against Ray's own schema,
and the commands they run through the CLI. (KubeRay manifests: tests/test_k8s.py.)"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def rayllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_as_its_header_says(recipe):
    """Each recipe's header names the command that runs it (``rayllm STAGE --config FILE``)."""
    command = re.search(r"^#\s+rayllm (\w+) --config (\S+)", recipe.read_text(), re.M)
    assert command, f"{recipe.name}: no '# rayllm STAGE --config FILE' line in the header"
    stage, path = command.groups()
    assert (REPO / path).resolve() == recipe
    done = rayllm("config", stage, "--config", str(recipe))
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)


def job_command(text: str) -> list[str]:
    """A ``python jobs/X.py --config ... --set ...`` command, with the image's /opt/rayllm
    read as this checkout."""
    words = shlex.split(text.replace("/opt/rayllm/", ""))
    assert words[0] == "python" and words[1].startswith("jobs/"), words
    return words[1:]


def check_job(words: list[str]) -> None:
    """The command a job entrypoint runs: a stage takes the job's recipe and overrides
    through ``rayllm config``; any other command (``registry publish``) exists."""
    entrypoint = (REPO / words[0]).read_text()
    listed = re.search(r"sys.argv = \[(.*), \*sys.argv", entrypoint).group(1)
    command = json.loads(f"[{listed}]")
    assert command[0] == "rayllm", command
    if len(command) == 2:  # a stage: its config loads with the job's recipe and overrides
        done = rayllm("config", command[1], *words[1:])
    else:  # another command exists (its files are the cluster's, not this machine's)
        done = rayllm(*command[1:], "--help")
    assert done.returncode == 0, done.stderr


def test_cluster_launcher_config_matches_rays_schema():
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    text = (REPO / "cluster" / "local.yaml").read_text()
    for command in re.findall(r"-- (python jobs/.*)$", text, re.M):
        check_job(job_command(command))
    assert config["file_mounts"] == {"/opt/rayllm": "."}
    assert any("cluster/install.sh" in c for c in config["setup_commands"])
