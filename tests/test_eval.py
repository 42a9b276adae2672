"""``rayllm eval``'s inputs: a model given by registry reference or folder, refused clearly
when missing. (Its run, as a Ray job on a trained version: tests/train/test_resume.py.)"""

import pytest

from rayllm.errors import RayllmError
from rayllm.eval.config import EvalConfig


def test_a_model_is_required_and_must_be_in_the_registry(tmp_path):
    with pytest.raises(RayllmError, match="eval.model is required"):
        EvalConfig().model_folder()
    with pytest.raises(RayllmError, match="model 'nope' is not in the registry"):
        EvalConfig(model="nope", registry=str(tmp_path)).model_folder()


def test_a_model_folder_is_scored_as_it_is(tmp_path):
    assert EvalConfig(model=str(tmp_path)).model_folder() == (tmp_path, str(tmp_path))
