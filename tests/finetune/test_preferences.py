"""DPO's parts: preference pairs read in the reward-model format (or built from the chat
corpus) and refused when they prefer nothing; pairs packed as two segments each; per-segment
log-probabilities; and a loss of log 2 where the policy is still its reference."""

import json
import math

import numpy as np
import pytest
import torch

from rayllm.errors import RayllmError
from rayllm.finetune.examples import (
    built_preferences,
    pack_units,
    read_conversations,
    read_preferences,
)
from rayllm.model.model import IGNORED
from rayllm.train.objectives import dpo, preference_margins, segment_logprobs


def test_pairs_are_read_in_both_reward_model_formats_and_built_from_chat(tmp_path):
    rows = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_preferences(str(path)) == [
        ([{"role": "user", "content": "Hi?"}], "Hello.", "Go away."),
        ([{"role": "user", "content": "2+2?"}], "4", "5"),
    ]
    built = built_preferences(read_conversations("chat"), seed=0)
    assert len(built) > 1000 and all(chosen != rejected for _, chosen, rejected in built)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "Hi", "chosen": "Same.", "rejected": " Same. "}, "the same answer"),
        ({"prompt": "Hi", "chosen": "Yes."}, "not a preference pair"),
        ({"prompt": "Hi", "chosen": "", "rejected": "No."}, "chosen is empty"),
    ],
)
def test_a_pair_that_prefers_nothing_is_refused_with_its_line(tmp_path, row, problem):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(RayllmError, match=problem) as error:
        read_preferences(str(path))
    assert f"{path}:1" in str(error.value)


def test_pairs_pack_as_two_segments_and_score_per_segment():
    chosen, rejected = ([1, 2, 3], [False, True, True]), ([1, 4], [False, True])
    packed = pack_units([[chosen, rejected], [chosen, rejected]], seq_len=10, pad_id=0)
    assert packed.segments.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 4, 4]]
    batch = tuple(torch.from_numpy(a.astype(np.int64)) for a in packed.arrays().values())
    logits = torch.randn(1, 10, 8)
    logps = torch.log_softmax(logits, -1)[0]
    expected_chosen = logps[0, 2] + logps[1, 3]  # targets 2 -> 3 of segment 1
    scores = segment_logprobs(logits, batch, 4)
    assert scores[0, 0] == pytest.approx(expected_chosen.item(), abs=1e-5)
    assert scores[0, 1] == pytest.approx(logps[3, 4].item(), abs=1e-5)
    assert (packed.targets[0, [2, 4, 7, 9]] == IGNORED).all()  # no target across examples

    reference = scores.clone()
    reference[0, 2:] = float("nan")  # as if the row held one pair only
    loss = dpo(beta=0.1)(logits, (*batch, reference))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference
    rewards, policy = preference_margins(logits + 0.0, (*batch, reference), beta=0.1)
    assert rewards.tolist() == [0.0] and policy[0] == pytest.approx(
        (scores[0, 0] - scores[0, 1]).item()
    )
