"""Every parallel strategy trains the same model to the same numbers on a real 2-worker run."""

import pytest
import torch
from safetensors.torch import load_file

from rayllm.config import build_config
from rayllm.train.config import TrainConfig
from rayllm.train.trainer import run
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.slow

STRATEGIES = {
    "ddp": {"strategy": "ddp", "zero_stage": 0},
    "zero3": {"strategy": "zero", "zero_stage": 3},
    "zero2-offload": {"strategy": "zero", "zero_stage": 2, "offload_optimizer": True},
}


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    results = {}
    for name, parallel in STRATEGIES.items():
        out = tmp_path_factory.mktemp(name)
        config = build_config(
            TrainConfig,
            {
                "data": str(tiny_run["workdir"] / "data"),
                "storage": str(out / "runs"),
                "output": str(out / "hf"),
                "run_name": name,
                "steps": 3,
                "micro_batch_size": 2,
                "cpus_per_worker": 0.5,
                "log_every": 3,
                "eval_every": 3,
                "checkpoint_every": 3,
                "eval_batches": 1,
                "parallel": parallel,
                "model": TINY_MODEL,
            },
        )
        result = run(config)
        results[name] = (result, load_file(str(out / "hf" / "model.safetensors")))
    return results


def test_strategies_agree_on_loss(trained):
    losses = {name: result.metrics["loss"] for name, (result, _) in trained.items()}
    reference = losses["ddp"]
    assert all(abs(loss - reference) < 1e-3 for loss in losses.values()), losses


def test_strategies_export_the_same_weights(trained):
    _, ddp = trained["ddp"]
    for name in ("zero3", "zero2-offload"):
        _, weights = trained[name]
        assert weights.keys() == ddp.keys()
        for key in ddp:
            torch.testing.assert_close(
                weights[key], ddp[key], rtol=1e-4, atol=1e-4, msg=f"{name}: {key}"
            )
