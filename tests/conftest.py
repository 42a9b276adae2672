"""Shared fixtures: one isolated local Ray cluster and one tiny end-to-end run per session."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray of its own (temp dir, ports), shared by every test that needs one."""
    import ray

    temp = tempfile.mkdtemp(prefix="rayllm-test-ray-")
    ray.init(
        address="local",
        num_cpus=8,
        _temp_dir=temp,
        dashboard_port=free_port(),
        include_dashboard=True,
        logging_level="WARNING",
    )
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, tmp_path_factory):
    """The whole lifecycle at reduced size, run once; several tests read its outputs."""
    from rayllm.config import build_config
    from rayllm.lifecycle import LifecycleConfig, run

    work = tmp_path_factory.mktemp("lifecycle")
    config = build_config(
        LifecycleConfig,
        {
            "workdir": str(work),
            "model_name": "tiny-shakespeare",
            "data": {
                "max_documents": 6000,
                "tokenizer": {"vocab_size": 1024},
                "seq_len": 64,
                "val_fraction": 0.05,
            },
            "train": {
                "steps": 12,
                "micro_batch_size": 4,
                "cpus_per_worker": 0.5,
                "log_every": 4,
                "eval_every": 6,
                "checkpoint_every": 6,
                "eval_batches": 2,
                "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 128},
            },
            "serve": {"port": free_port(), "max_replicas": 1, "max_num_seqs": 4},
            "prompts": ["ROMEO.\n", "JULIET.\n"],
            "max_tokens": 12,
        },
    )
    report = run(config)
    return {"report": report, "workdir": Path(work), "config": config}
