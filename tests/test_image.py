"""cluster/Dockerfile builds on the Ray image of the pinned Ray and Python, for CPUs or GPUs
from the same install script; the rendered manifests name the images it builds."""

import re
import subprocess
import tomllib

import yaml

from tests.test_recipes import REPO

DOCKERFILE = (REPO / "cluster" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, re.M))


def test_the_base_image_is_rays_at_the_pinned_versions():
    args = build_args()
    pins = dict(
        re.match(r"([\w-]+)(?:\[.*\])?==(\S+)", dependency).groups()
        for dependency in PYPROJECT["project"]["dependencies"]
        if "==" in dependency
    )
    assert args["RAY_VERSION"] == pins["ray"]
    python = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"]).group(1)
    install = (REPO / "cluster" / "install.sh").read_text()
    assert f"python=${{PYTHON:-python3.{python}}}" in install  # what make install creates
    low, high = re.fullmatch(
        r">=3\.(\d+),<3\.(\d+)", PYPROJECT["project"]["requires-python"]
    ).groups()
    assert int(low) <= int(python) < int(high)
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${DEVICE}" in DOCKERFILE
    assert args["DEVICE"] == "cpu"


def test_the_build_argument_picks_the_device_for_the_install_script():
    assert "RAYLLM_DEVICE=${DEVICE} bash cluster/install.sh" in DOCKERFILE
    done = subprocess.run(
        ["bash", str(REPO / "cluster" / "install.sh"), "/nonexistent/venv"],
        env={"PATH": "/usr/bin:/bin", "RAYLLM_DEVICE": "tpu"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "RAYLLM_DEVICE=tpu is neither cpu nor gpu" in done.stderr


def test_gpu_nodes_run_the_gpu_image():
    cluster = yaml.safe_load((REPO / "k8s" / "raycluster.yaml").read_text())["spec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        on_gpu = "nvidia.com/gpu" in container["resources"]["limits"]
        assert container["image"].endswith("-gpu") == on_gpu, container["image"]
