"""Every recipe, cluster config and manifest in the repository loads through the code that
reads it: job recipes through ``rayllm config``, the cluster launcher config against Ray's
own schema, KubeRay manifests against the KubeRay CRDs (unknown fields refused, as
``kubectl apply --validate=strict`` does), and the commands they run through the CLI."""

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
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))


def rayllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_there_are_recipes_and_manifests():
    assert RECIPES and MANIFESTS


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


def _job_command(text: str) -> list[str]:
    """A ``python jobs/X.py --config ... --set ...`` command, with the image's /opt/rayllm
    read as this checkout."""
    words = shlex.split(text.replace("/opt/rayllm/", ""))
    assert words[0] == "python" and words[1].startswith("jobs/"), words
    return words[1:]


def _check_job(words: list[str]) -> None:
    """The stage a job entrypoint runs gets the job's arguments, through ``rayllm config``."""
    entrypoint = (REPO / words[0]).read_text()
    stage = re.search(r'sys.argv = \["rayllm", "(\w+)"', entrypoint).group(1)
    done = rayllm("config", stage, *words[1:])
    assert done.returncode == 0, done.stderr


def _strict(schema: object) -> object:
    """The CRD schema with unknown fields refused wherever Kubernetes would prune them."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_crd_and_its_job_loads(manifest):
    document = yaml.safe_load(manifest.read_text())
    assert document["apiVersion"] == "ray.io/v1"
    kind = document["kind"].lower() + "s"
    schema = json.loads((REPO / "tests" / "kuberay" / f"{kind}.v1.schema.json").read_text())
    jsonschema.validate(document, _strict(schema))
    if document["kind"] == "RayJob":
        assert document["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
        _check_job(_job_command(document["spec"]["entrypoint"]))


def test_cluster_launcher_config_matches_rays_schema():
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    text = (REPO / "cluster" / "local.yaml").read_text()
    for command in re.findall(r"-- (python jobs/.*)$", text, re.M):
        _check_job(_job_command(command))
    assert config["file_mounts"] == {"/opt/rayllm": "."}
    assert any("cluster/install.sh" in c for c in config["setup_commands"])
