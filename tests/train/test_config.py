"""Training config checks that run before any worker starts."""

import pytest

from rayllm.errors import RayllmError
from rayllm.train.config import TrainConfig
from rayllm.train.parallelize import lr_schedule
from rayllm.train.trainer import resolve_model_shape

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
