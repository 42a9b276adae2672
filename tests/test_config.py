"""Configs: YAML + ``--set`` overrides, and one clear message for unknown or bad keys."""

import pytest

from rayllm.config import dump_config, load_config
from rayllm.errors import RayllmError
from rayllm.lifecycle import LifecycleConfig
from rayllm.train.config import TrainConfig


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 50\n  parallel:\n    zero_stage: 3\n")
    config = load_config(LifecycleConfig, path, ["train.steps=7", "data.corpus=/data/*.txt"])
    assert config.train.steps == 7
    assert config.train.parallel.zero_stage == 3
    assert config.data.corpus == "/data/*.txt"


def test_dumped_defaults_load_back(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text(dump_config(LifecycleConfig()))
    assert load_config(LifecycleConfig, path) == LifecycleConfig()


def test_unknown_key_is_named():
    with pytest.raises(RayllmError, match="unknown config key 'train.stepz'"):
        load_config(LifecycleConfig, None, ["train.stepz=3"])


def test_bad_value_is_named():
    with pytest.raises(RayllmError, match="train.parallel.zero_stage"):
        load_config(LifecycleConfig, None, ["train.parallel.zero_stage=5"])


def test_override_needs_equals():
    with pytest.raises(RayllmError, match="KEY=VALUE"):
        load_config(TrainConfig, None, ["steps"])


def test_offload_needs_zero():
    with pytest.raises(RayllmError, match="offload_optimizer"):
        load_config(TrainConfig, None, ["parallel.strategy=ddp", "parallel.offload_optimizer=true"])


def test_partial_section_keeps_the_parents_defaults():
    config = load_config(LifecycleConfig, None, ["data.seq_len=64"])
    assert config.data.seq_len == 64
    assert config.data.c4.enabled is False  # the lifecycle's own data default survives
    assert config.data.gopher_quality.min_words == 5


def test_lifecycle_paths_go_under_workdir_and_hand_offs_chain(tmp_path):
    config = load_config(LifecycleConfig, None, [f"workdir={tmp_path}", "train.output=/models/m"])
    data, train, root, serve = config.stages()
    assert data.output == f"{tmp_path}/data"
    assert train.data == data.output  # the training stage reads what the data stage writes
    assert train.output == "/models/m"  # a path the user set is kept
    assert train.storage == f"{tmp_path}/runs"
    assert serve.registry == root


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("train.data=/elsewhere", "train.data"),
        ("serve.registry=/other/registry", "serve.registry"),
        ("serve.model=someone-else@production", "serve.model"),
    ],
)
def test_a_conflicting_hand_off_names_the_key(setting, key):
    config = load_config(LifecycleConfig, None, [setting])
    with pytest.raises(RayllmError, match=f"^{key} is .*; remove {key}"):
        config.stages()
