"""Chat examples: read and checked line by line, rendered with a real chat template (the
built-in SmolLM2's) with exactly the assistant's tokens trained on, and packed into rows whose
examples the model computes as if each were alone."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from rayllm.errors import RayllmError
from rayllm.finetune.examples import Counts, pack, read_conversations, render
from rayllm.model.config import IGNORED, ModelConfig
from rayllm.model.model import Transformer
from rayllm.registry.importers import builtin_gguf


@pytest.fixture(scope="module")
def tokenizer():
    gguf = builtin_gguf("smollm2")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def write_lines(path, rows) -> str:
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    )
    return str(path)


def test_the_three_shapes_of_a_line_read_as_conversations(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    rows = [
        {"messages": messages},
        {"prompt": "2+2?", "response": "4"},
        {"question": "Who?", "answer": "Me.", "topic": "ignored"},
        "",
    ]
    read = read_conversations(write_lines(tmp_path / "chat.jsonl", rows))
    assert read == [
        messages,
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."}],
    ]
    builtin = read_conversations("chat")
    assert len(builtin) > 1000 and all(c[-1]["role"] == "assistant" for c in builtin)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}, "no role"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "the role 'wizard'"),
        ({"prompt": "Hi", "response": "  "}, "empty assistant response"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
        ({"text": "plain text"}, "neither messages nor a prompt and a response"),
        ({"messages": []}, "non-empty list"),
        ("{not json", "is not JSON"),
    ],
)
def test_a_bad_line_is_refused_with_its_place(tmp_path, row, problem):
    path = write_lines(tmp_path / "chat.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(RayllmError, match=problem) as error:
        read_conversations(path)
    assert f"{path}:2" in str(error.value)


def test_exactly_the_assistant_turns_are_trained_on(tokenizer):
    conversation = [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "A field of study."},
        {"role": "user", "content": "And ML?"},
        {"role": "assistant", "content": "Part of it."},
    ]
    ids, trained = render(tokenizer, conversation)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
    spans, current = [], []
    for token, train in zip([*ids, None], [*trained, False], strict=True):
        if train:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans == ["A field of study.<|im_end|>\n", "Part of it.<|im_end|>\n"]


def test_packing_keeps_examples_whole_and_targets_inside_them():
    examples = [
        ([1, 2, 3, 4], [False, False, True, True]),
        ([5, 6, 7], [False, True, True]),
        ([8, 9, 10, 11, 12, 13], [False, False, False, False, True, True]),
    ]
    counts = Counts()
    packed = pack(examples, seq_len=8, pad_id=0, counts=counts)
    assert packed.inputs.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0], [8, 9, 10, 11, 12, 13, 0, 0]]
    assert packed.segments.tolist() == [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    x = IGNORED
    assert packed.targets.tolist() == [[x, 3, 4, x, 6, 7, x, x], [x, x, x, 12, 13, x, x, x]]
    assert packed.trained_tokens == 6 and counts.examples == 3 and counts.truncated == 0

    long = [([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [False] * 3 + [True] * 7)]
    counts = Counts()
    assert pack(long, seq_len=8, pad_id=0, counts=counts).inputs.shape == (1, 8)
    assert counts.truncated == 1
    with pytest.raises(RayllmError, match="more than the 8 its row leaves it"):
        pack(long, seq_len=8, pad_id=0, strict=True)
    prompt_only = [([1] * 10, [False] * 9 + [True])]  # its response is cut away
    with pytest.raises(RayllmError, match="no example has a response token"):
        pack(prompt_only, seq_len=8, pad_id=0)


def test_a_packed_row_computes_each_example_as_if_alone():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=50, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=96)
    )
    first, second = [3, 4, 5, 6, 7], [8, 9, 10]
    packed = pack([(first, [True] * 5), (second, [True] * 3)], seq_len=10, pad_id=0)
    inputs, segments = (
        torch.from_numpy(a.astype(np.int64)) for a in (packed.inputs, packed.segments)
    )
    together = model(inputs, segments)
    alone = [model(torch.tensor([ids])) for ids in (first, second)]
    torch.testing.assert_close(together[:, :5], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[:, 5:8], alone[1], atol=1e-5, rtol=0)


def test_the_safety_mixture_takes_its_share_of_the_training_examples():
    from rayllm.eval.safety import training_conversations
    from rayllm.finetune.trainer import with_safety

    chat = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
        for i in range(90)
    ]
    mixed = with_safety(chat, 0.1, seed=0)
    assert len(mixed) == 100 and sum(c in training_conversations() for c in mixed) == 10
    assert with_safety(chat, 0.0, seed=0) == chat
