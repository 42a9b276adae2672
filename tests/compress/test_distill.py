"""Distillation's parts in this process: the loss (the student alone at alpha 0, no KL term
where the student already predicts what the teacher does, gradients towards the teacher), the
student's shape and its start from the teacher's layers, and the refusals of a teacher that reads other tokens than the data's or
settings that rayllm compress sets itself."""

import json

import pytest
import torch

from rayllm.compress.config import CompressConfig, StudentShape
from rayllm.compress.distill import starting_student, teacher_layers
from rayllm.data.config import TokenizerConfig
from rayllm.data.tokenizer import save_tokenizer, train_tokenizer
from rayllm.errors import RayllmError
from rayllm.model.config import ModelConfig
from rayllm.model.model import IGNORED, Transformer, next_token_loss
from rayllm.train.config import TrainConfig
from rayllm.train.objectives import distillation, softened_kl
from rayllm.train.preflight import with_teacher_vocabulary


def batch(rows: int = 2, length: int = 6, vocab: int = 11) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, vocab, (rows, length), generator=generator)
    targets[0, :2] = IGNORED  # a prompt: no target there
    return torch.zeros_like(targets), targets


def test_alpha_zero_is_the_next_token_loss_and_the_teacher_is_not_asked():
    logits, data = torch.randn(2, 6, 11), batch()

    def no_teacher(_):
        raise AssertionError("alpha 0 needs no teacher")

    loss = distillation(no_teacher, alpha=0.0, temperature=2.0)(logits, data)
    assert loss == pytest.approx(next_token_loss(logits, data[1]).item())


def test_a_student_that_predicts_what_the_teacher_does_pays_the_next_token_loss_alone():
    logits, data = torch.randn(2, 6, 11), batch()
    loss = distillation(lambda _: logits + 3.0, alpha=0.25, temperature=2.0)(logits, data)
    assert loss == pytest.approx(0.75 * next_token_loss(logits, data[1]).item(), rel=1e-5)


def test_the_kl_term_pulls_the_student_towards_the_teacher_and_skips_untrained_positions():
    torch.manual_seed(0)
    student = torch.randn(2, 6, 11, requires_grad=True)
    teacher = torch.randn(2, 6, 11)
    trained = batch()[1] != IGNORED
    before = softened_kl(student, teacher, trained, 2.0)
    before.backward()
    assert torch.all(student.grad[0, :2] == 0)  # no target, no pull
    moved = student.detach() - 0.5 * student.grad
    assert softened_kl(moved, teacher, trained, 2.0) < before
    # T^2 keeps the term's size: the same logits at temperature 1 and 4 differ by less than 4x
    one, four = (softened_kl(student.detach(), teacher, trained, t) for t in (1.0, 4.0))
    assert 0.25 < (four / one).item() < 4


def test_the_student_is_the_teachers_shape_with_half_its_layers_unless_told():
    teacher = ModelConfig(vocab_size=64, dim=128, n_layers=6, n_heads=2, n_kv_heads=1, ffn_dim=256)
    assert StudentShape().of(teacher) == teacher.model_copy(update={"n_layers": 3})
    smaller = StudentShape(n_layers=2, dim=64, n_heads=2, ffn_dim=128).of(teacher)
    assert (smaller.n_layers, smaller.dim, smaller.ffn_dim, smaller.head_size) == (2, 64, 128, 32)
    with pytest.raises(RayllmError, match="distill.student: head size dim/n_heads = 20"):
        StudentShape(dim=40, n_heads=2).of(teacher)


@pytest.mark.parametrize("key", ["teacher", "init_from", "model.n_layers", "distill_alpha"])
def test_what_compress_sets_cannot_be_set_in_its_train_section(key):
    nested: dict = {"n_layers": 2} if key.startswith("model.") else {}
    value = nested or {"teacher": "x", "init_from": "x", "distill_alpha": 0.1}[key]
    train = {key.split(".")[0]: value}
    with pytest.raises(ValueError, match=f"distill.train.{key.split('.')[0]}: set by rayllm"):
        CompressConfig.model_validate({"method": "distill", "distill": {"train": train}})


def test_distilling_needs_a_teacher():
    with pytest.raises(ValueError, match="objective distill needs a teacher"):
        TrainConfig(objective="distill")
    TrainConfig(objective="distill", teacher="t", parallel={"strategy": "fsdp", "pp": 2})


def folder_with_tokenizer(path, vocab_size: int, model_vocab: int | None = None):
    texts = [f"the {word} of the king and the queen {n}" for n in range(50) for word in "abc"]
    tokenizer = train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=vocab_size))
    save_tokenizer(tokenizer, path)
    (path / "config.json").write_text(json.dumps({"vocab_size": model_vocab or len(tokenizer)}))
    return path


def test_a_teacher_must_read_the_datas_tokens_and_lends_the_model_its_vocabulary(tmp_path):
    data = tmp_path / "data"
    folder_with_tokenizer(data / "tokenizer", 300, 384)
    manifest = {"tokenizer": "tokenizer"}
    teacher = folder_with_tokenizer(tmp_path / "teacher", 300, 384)
    config = TrainConfig(objective="distill", teacher=str(teacher), data=str(data))
    assert with_teacher_vocabulary(config, manifest).model.vocab_size == 384
    mismatch = config.model_copy(update={"model": ModelConfig(vocab_size=512)})
    with pytest.raises(RayllmError, match="the teacher predicts 384 tokens"):
        with_teacher_vocabulary(mismatch, manifest)

    other = folder_with_tokenizer(tmp_path / "other", 280)
    with pytest.raises(RayllmError, match="have different tokenizers") as refused:
        with_teacher_vocabulary(config.model_copy(update={"teacher": str(other)}), manifest)
    assert "tokenizer.pretrained" in str(refused.value)
    with pytest.raises(RayllmError, match="is not a Hugging Face model folder"):
        with_teacher_vocabulary(config.model_copy(update={"teacher": str(tmp_path)}), manifest)


def test_the_student_starts_from_evenly_spaced_teacher_layers_of_its_widths():
    assert teacher_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert teacher_layers(4, 4) == [0, 1, 2, 3] and teacher_layers(2, 1) == [1]
    teacher = ModelConfig(vocab_size=32, dim=64, n_layers=4, n_heads=1, n_kv_heads=1, ffn_dim=96)
    state = Transformer(teacher).state_dict()
    student = teacher.model_copy(update={"n_layers": 2})
    start = starting_student(state, teacher, student)
    Transformer(student).load_state_dict(start)  # every weight, of the right shape
    assert torch.equal(start["layers.1.mlp.up_proj.weight"], state["layers.3.mlp.up_proj.weight"])
    assert torch.equal(start["lm_head.weight"], state["lm_head.weight"])
    narrower = student.model_copy(update={"ffn_dim": 48})
    with pytest.raises(RayllmError, match="the student changes ffn_dim .* distill.init=random"):
        starting_student(state, teacher, narrower)
    deeper = teacher.model_copy(update={"n_layers": 6})
    with pytest.raises(RayllmError, match="the student has 6 layers"):
        starting_student(state, teacher, deeper)
