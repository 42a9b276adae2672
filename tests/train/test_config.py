"""Training config checks that run before any worker starts."""

import pytest

from rayllm.errors import RayllmError
from rayllm.train.config import TrainConfig
from rayllm.train.mesh import MeshShape, mesh_shape
from rayllm.train.optim import lr_schedule
from rayllm.train.preflight import resolve_model_shape

MANIFEST = {"vocab_size": 1000, "seq_len": 64}


def test_vocab_is_filled_from_the_tokenizer():
    config = resolve_model_shape(TrainConfig(), MANIFEST)
    assert config.model.vocab_size == 1024
    assert config.model.max_seq_len == TrainConfig().model.max_seq_len  # the user's, kept


def test_warmup_is_a_tenth_of_the_steps_unless_set():
    assert TrainConfig(steps=50).warmup == 5
    assert TrainConfig(steps=50, warmup_steps=0).warmup == 0
    with pytest.raises(ValueError, match="warmup_steps \\(60\\) must be .* below steps \\(50\\)"):
        TrainConfig(steps=50, warmup_steps=60)


def test_vocab_smaller_than_tokenizer_is_refused():
    config = TrainConfig.model_validate({"model": {"vocab_size": 512}})
    with pytest.raises(RayllmError, match="at least 1000"):
        resolve_model_shape(config, MANIFEST)


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4)
    factor = lr_schedule(config)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(55) < factor(20) < 1.0
    assert factor(100) == pytest.approx(0.1)


def test_warmup_stable_decay_holds_then_decays_over_the_last_fraction():
    config = TrainConfig(
        steps=100,
        warmup_steps=10,
        lr_schedule="wsd",
        decay_fraction=0.2,
        learning_rate=1e-3,
        min_learning_rate=1e-4,
    )
    factor = lr_schedule(config)
    assert factor(4) == pytest.approx(0.5)
    assert factor(10) == factor(79) == 1.0
    assert factor(90) == pytest.approx(0.55)
    assert factor(100) == pytest.approx(0.1)


def layout(**settings) -> TrainConfig:
    model = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 256}
    return TrainConfig.model_validate({"model": model} | settings)


@pytest.mark.parametrize(
    ("settings", "shape"),
    [
        ({"num_workers": 4, "parallel": {"strategy": "ddp"}}, MeshShape(1, 4, 1, 1)),
        ({"num_workers": 4, "parallel": {"strategy": "fsdp"}}, MeshShape(1, 1, 4, 1)),
        (
            {"num_workers": 8, "parallel": {"strategy": "fsdp", "dp_replicate": 2}},
            MeshShape(1, 2, 4, 1),
        ),
        (
            {"num_workers": 8, "parallel": {"strategy": "fsdp", "tp": 2, "pp": 2}},
            MeshShape(2, 1, 2, 2),
        ),
        ({"num_workers": 4, "parallel": {"strategy": "zero"}}, MeshShape(1, 4, 1, 1)),
    ],
)
def test_the_mesh_is_what_the_workers_leave_after_tp_and_pp(settings, shape):
    assert mesh_shape(layout(**settings)) == shape


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_workers": 3, "parallel": {"strategy": "fsdp", "tp": 2}}, "not a multiple of"),
        ({"num_workers": 6, "parallel": {"strategy": "fsdp", "dp_replicate": 4}}, "do not split"),
        (
            {"num_workers": 8, "parallel": {"strategy": "fsdp", "tp": 8}},
            "n_heads \\(4\\) is not divisible",
        ),
        (
            {"num_workers": 4, "parallel": {"strategy": "fsdp", "tp": 4}},
            "n_kv_heads \\(2\\) is not divisible",
        ),
        (
            {"num_workers": 8, "parallel": {"strategy": "ddp", "pp": 8}},
            "fewer than the 8 pipeline stages",
        ),
        (
            {
                "num_workers": 4,
                "parallel": {"strategy": "ddp", "pp": 4, "pp_schedule": "interleaved_1f1b"},
            },
            "fewer than the 8 pipeline stages",
        ),
        (
            {
                "num_workers": 2,
                "micro_batch_size": 6,
                "parallel": {"strategy": "ddp", "pp": 2, "pp_microbatches": 4},
            },
            "does not split into",
        ),
    ],
)
def test_layouts_that_do_not_fit_are_refused_with_the_reason(settings, message):
    with pytest.raises(RayllmError, match=message):
        mesh_shape(layout(**settings))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"parallel": {"strategy": "zero", "pp": 2}}, "ZeRO-2/3 do not compose with pipelines"),
        (
            {"parallel": {"strategy": "zero", "zero_stage": 2, "offload_params": True}},
            "zero_stage 3",
        ),
        ({"parallel": {"strategy": "ddp", "fsdp_offload": True}}, "fsdp_offload needs"),
        ({"parallel": {"strategy": "ddp", "dp_replicate": 2}}, "needs strategy 'fsdp'"),
        ({"parallel": {"strategy": "fsdp", "sequence_parallel": True}}, "needs tp > 1"),
        ({"precision": "fp16"}, "fp16 needs GPUs"),
        ({"data_loader": "ray_data", "parallel": {"strategy": "fsdp", "tp": 2}}, "must share"),
        (
            {"precision": "fp16", "use_gpu": True, "parallel": {"strategy": "fsdp"}},
            "use strategy 'zero'",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        layout(**settings)


def test_the_readme_training_layout_loads_and_fits():
    """The YAML example of the README's Training section is a valid layout on its workers."""
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Training") :]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    config = TrainConfig.model_validate(example)
    assert mesh_shape(config) == MeshShape(pp=2, dp_replicate=1, dp_shard=2, tp=2)


SCALE_MODELS = {
    "8 B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336},
    "70 B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim": 28672},
}


def test_the_scale_plans_layouts_fit_their_models_and_gpus():
    """Every layout of cluster/scale.md's pretraining table is one rayllm accepts, and its
    mesh multiplies to the row's GPUs."""
    import re
    from pathlib import Path

    plan = (Path(__file__).resolve().parents[2] / "cluster" / "scale.md").read_text()
    rows = re.findall(r"^\| (8 B|70 B) \| ([\d,]+) \| `fsdp`, ([^|]*)\|", plan, re.M)
    assert len(rows) == 6
    for model, gpus, layout in rows:
        sizes = {
            name: int(n) for name, n in re.findall(r"(tp|pp|dp_replicate|dp_shard) (\d+)", layout)
        }
        parallel = {"strategy": "fsdp"} | {k: v for k, v in sizes.items() if k != "dp_shard"}
        if "pp" in sizes:
            parallel |= {"pp_schedule": "interleaved_1f1b", "pp_microbatches": 16}
        config = TrainConfig.model_validate(
            {
                "num_workers": int(gpus.replace(",", "")),
                "micro_batch_size": 16 if "pp" in sizes else 1,
                "precision": "bf16",
                "model": SCALE_MODELS[model] | {"max_seq_len": 8192},
                "parallel": parallel,
            }
        )
        expected = {"pp": 1, "dp_replicate": 1, "tp": 1} | sizes
        assert mesh_shape(config) == MeshShape(**expected), (model, gpus, layout)
