"""The stage entrypoints in jobs/ as a cluster runs them: submitted with Ray's Jobs SDK to the
session's head, with the repository as the working directory. (Training's job, stopped and
resumed, is in tests/train/test_resume.py; the lifecycle's is the session's ``tiny_run``.)"""

import shlex
import time

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.conftest import REPO
from tests.test_readme import block_with

pytestmark = pytest.mark.slow


def readme_job(entrypoint: str, shared: str) -> list[str]:
    """The README's ``ray job submit ... -- python ENTRYPOINT ...`` line: what follows
    ``python``, with its shared folder (``/shared/work``) replaced by ``shared``."""
    block = block_with(f"python {entrypoint}")
    for line in block.splitlines():
        words = shlex.split(line.split("  #")[0])
        if words[:3] == ["ray", "job", "submit"] and f"python {entrypoint}" in line:
            command = words[words.index("--") + 1 :]
            assert command[:2] == ["python", entrypoint], command
            return [word.replace("/shared/work", shared) for word in command[1:]]
    raise AssertionError(f"no `ray job submit` of {entrypoint} in the README")


def submit(dashboard: str, *words: str) -> tuple[JobSubmissionClient, str]:
    """``ray job submit --working-dir . -- python WORDS...``, without waiting."""
    client = JobSubmissionClient(dashboard)
    job = client.submit_job(
        entrypoint=shlex.join(["python", *words]), runtime_env={"working_dir": str(REPO)}
    )
    return client, job


def wait(client: JobSubmissionClient, job: str, timeout_s: float = 600) -> JobStatus:
    deadline = time.time() + timeout_s
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.time() < deadline, f"job {job} still {status} after {timeout_s} s"
        time.sleep(1)
    return status


def run_job(dashboard: str, *words: str) -> tuple[str, str]:
    """Submit, wait for SUCCEEDED, and return the job's logs and its Ray job id."""
    client, job = submit(dashboard, *words)
    status = wait(client, job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"{shlex.join(words)}: {status}\n{logs[-4000:]}"
    return logs, client.get_job_info(job).job_id


def test_the_data_job_curates_its_recipe_over_the_nodes_onto_shared_storage(
    ray_cluster, worker_nodes, s3
):
    """The README's data job (the Bible recipe, every block on) at reduced size, on a head and
    two worker nodes: its tasks run on more than one node, and its shards go to object storage
    (the job's own working directory is gone once it ends)."""
    from ray.util.state import list_tasks

    shared = f"s3://{s3['bucket']}/jobs"
    sizes = ["max_documents=150", "tokenizer.vocab_size=512", "seq_len=64", "workers=1"]
    sets = [word for size in sizes for word in ("--set", size)]
    logs, job_id = run_job(ray_cluster["dashboard"], *readme_job("jobs/data.py", shared), *sets)
    output = f"{shared}/data-bible"
    assert f"shards, tokenizer and stats.json written to {output}" in logs
    import fsspec

    assert fsspec.filesystem("s3").exists(f"{output}/manifest.json")
    tasks = list_tasks(
        filters=[("job_id", "=", job_id)], limit=10_000, raise_on_missing_output=False
    )
    nodes = {task.node_id for task in tasks if task.node_id}
    assert len(nodes) > 1 and nodes & set(worker_nodes.alive().values()), nodes
