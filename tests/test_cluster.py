"""Connecting to Ray without RAY_ADDRESS: a run starts its own local cluster, as ``RayConfig``
says, even where ``ray start`` left one running on the machine (which ``ray.init`` would join
otherwise, and then refuse the local cluster's CPU count)."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN = """
import ray
from rayllm.cluster import RayConfig, connect
connect(RayConfig(num_cpus=1, temp_dir={temp!r}))
print(ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def test_a_run_without_ray_address_starts_its_own_cluster_beside_a_running_one(ray_head):
    temp = Path(tempfile.mkdtemp(prefix="rayllm-local-"))  # short: Ray's socket paths
    (temp / "ray_current_cluster").write_text(ray_head["address"])  # as `ray start` leaves it
    env = ray_head["env"].copy()
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", RUN.format(temp=str(temp))],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    started = done.stdout.strip().splitlines()[-1]
    assert started and started != ray_head["address"]
