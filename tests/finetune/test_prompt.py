"""Prompt and prefix tuning on rayllm's decoder: virtual tokens before every packed example
compute what peft computes for the saved adapter on the Hugging Face base, one example at a
time."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rayllm.data.config import TokenizerConfig
from rayllm.data.tokenizer import save_tokenizer, train_tokenizer
from rayllm.errors import RayllmError
from rayllm.eval.models import load_model
from rayllm.finetune.config import FinetuneConfig
from rayllm.finetune.examples import pack
from rayllm.model.config import IGNORED, ModelConfig
from rayllm.model.hf import save_hf_model
from rayllm.model.model import Transformer
from rayllm.registry.importers import import_adapter
from rayllm.registry.merge import publish_merged
from rayllm.registry.store import Registry
from rayllm.train.config import PromptSettings, TrainConfig
from rayllm.train.engine import build_model
from rayllm.train.lora import trainable_parameters
from rayllm.train.prompt import save_virtual_token_adapter, virtual_tokens

SHAPE = ModelConfig(
    vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=96, tie_embeddings=True
)
PROMPT = PromptSettings(num_virtual_tokens=3)


def with_virtual_tokens(folder: Path, settings: PromptSettings) -> Transformer:
    """A seeded random base, saved in ``folder / "base"``, loaded frozen with ``settings``'
    virtual tokens to train, as a fine-tuning rank builds it."""
    torch.manual_seed(0)
    save_hf_model(
        folder / "base", SHAPE, Transformer(SHAPE).state_dict(), bos_token_id=0, eos_token_id=0
    )
    config = TrainConfig(model=SHAPE, init_from=str(folder / "base"), prompt=settings)
    return build_model(config, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_packed_examples_with_virtual_tokens_are_what_peft_computes_alone(tmp_path, kind):
    settings = PROMPT.model_copy(update={"kind": kind})
    model = with_virtual_tokens(tmp_path, settings)
    learned = [p for p in model.parameters() if p.requires_grad]
    if kind == "prompt":  # 3 embeddings; a head tied to the embedding stays tied
        assert trainable_parameters(model) == 3 * SHAPE.dim
        assert model.lm_head.weight is model.embed_tokens.embedding.weight
    else:  # 3 keys and values of every layer
        assert trainable_parameters(model) == 3 * SHAPE.n_layers * 2 * SHAPE.head_size
    with torch.no_grad():  # away from the vocabulary's they start as
        for param in learned:
            param.normal_()

    virtual = virtual_tokens(SHAPE.vocab_size, PROMPT)
    assert virtual == [64, 65, 66]
    examples = [([5, 9, 12, 7], [False, False, True, True]), ([3, 8, 30], [False, True, True])]
    packed = pack(examples, 16, pad_id=0, virtual=virtual)
    (row,) = packed.inputs
    assert list(row[:7]) == [*virtual, 5, 9, 12, 7]
    assert list(packed.targets[0, :6]) == [IGNORED] * 4 + [12, 7]  # virtual tokens: no target
    with torch.no_grad():
        ours = model(torch.as_tensor(packed.inputs), torch.as_tensor(packed.segments))

    save_virtual_token_adapter(model, settings, tmp_path / "adapter", str(tmp_path / "base"))
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    # What rayllm eval scores: the adapter published against its base, read from the registry.
    save_tokenizer(train_tokenizer(["to be or not"] * 4, TokenizerConfig()), tmp_path / "base")
    registry = Registry(str(tmp_path / "registry"))
    registry.publish("base", tmp_path / "base", {"architecture": "LlamaForCausalLM"})
    import_adapter(registry, "tuned", tmp_path / "adapter", "base:1")
    scored, _ = load_model(str(tmp_path / "registry"), "tuned:1")
    start = 0
    for ids, _ in examples:
        with torch.no_grad():
            alone = peft_model(input_ids=torch.tensor([ids])).logits
            evaluated = scored(torch.tensor([ids])).logits
        end = start + len(virtual) + len(ids)
        # peft's prompt tuning answers for the virtual tokens too; its prefix is a cache
        torch.testing.assert_close(
            ours[:, start + len(virtual) : end], alone[:, -len(ids) :], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            evaluated, ours[:, start + len(virtual) : end], atol=1e-4, rtol=0
        )
        start = end
    ids = torch.tensor([examples[0][0]])
    generated = scored.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2
    )
    assert generated[0, 4] == ours[0, 6].argmax()  # its first new token: the greedy one
    with torch.no_grad():
        plain = hf_base(input_ids=torch.tensor([examples[0][0]])).logits
    assert not torch.allclose(plain, ours[:, 3:7], atol=1e-3)  # the prompt changes the answer


def test_prompt_tuning_is_refused_where_it_cannot_train():
    with pytest.raises(ValueError, match="prompt and prefix tuning train with data parallelism"):
        FinetuneConfig(base="m", method="prompt", train={"parallel": {"strategy": "fsdp", "tp": 2}})
    with pytest.raises(ValueError, match="prompt.kind follows method"):
        FinetuneConfig(base="m", method="prompt", prompt={"kind": "prefix"})
    with pytest.raises(ValueError, match="set one of them"):
        TrainConfig(prompt=PROMPT, lora={})
    with pytest.raises(ValueError, match="train.prompt: set by rayllm finetune"):
        FinetuneConfig(base="m", train={"prompt": {"num_virtual_tokens": 4}})


def test_a_prompt_adapter_publishes_against_a_base_of_its_width_and_does_not_merge(
    tmp_path,
):
    model = with_virtual_tokens(tmp_path, PROMPT)
    save_virtual_token_adapter(model, PROMPT, tmp_path / "adapter", "base:1")
    registry = Registry(str(tmp_path / "registry"))
    registry.publish("base", tmp_path / "base", {"architecture": "LlamaForCausalLM"})
    wider = SHAPE.model_copy(update={"dim": 128, "n_heads": 4, "n_kv_heads": 2})
    save_hf_model(
        tmp_path / "wider", wider, Transformer(wider).state_dict(), bos_token_id=0, eos_token_id=0
    )
    registry.publish("wider", tmp_path / "wider", {"architecture": "LlamaForCausalLM"})

    version = import_adapter(registry, "prompted", tmp_path / "adapter", "base:1")
    assert version.lineage["adapter"] == {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}
    with pytest.raises(
        RayllmError,
        match=r"prompt_embeddings .3, 64. do not fit wider:1 \(its embedding: 128 wide\)",
    ):
        import_adapter(registry, "misfit", tmp_path / "adapter", "wider:1")
    with pytest.raises(RayllmError, match="PROMPT_TUNING adapter, which does not merge"):
        publish_merged(registry, "prompted:1", "merged")
    with pytest.raises(RayllmError, match="base:1 is a full model, not an adapter"):
        publish_merged(registry, "base:1", "merged")
    assert registry.versions("merged") == []


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_tokens_teach_a_frozen_base_an_answer_its_weights_do_not_give(tmp_path, kind):
    """Training the virtual tokens alone lowers the loss of an answer the frozen (random) base
    does not give, on prompts it never trained on: the gradients reach them. (The README's
    fine-tuning test runs both methods on the session's model, a few steps from unigram
    statistics, which reads too little of its context for virtual tokens to move its held-out
    loss beyond noise.)"""
    settings = PROMPT.model_copy(update={"kind": kind})
    model = with_virtual_tokens(tmp_path, settings)
    virtual = virtual_tokens(SHAPE.vocab_size, settings)

    def loss(seed: int) -> torch.Tensor:
        """Eight random prompts, each answered with token 42."""
        prompts = torch.randint(1, 40, (8, 5), generator=torch.Generator().manual_seed(seed))
        examples = [([*p.tolist(), 42], [False] * 5 + [True]) for p in prompts]
        packed = pack(examples, 16, pad_id=0, virtual=virtual)
        logits = model(torch.as_tensor(packed.inputs), torch.as_tensor(packed.segments))
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1),
            torch.as_tensor(packed.targets).long().flatten(),
            ignore_index=IGNORED,
        )

    with torch.no_grad():
        before = loss(seed=-1)  # held out
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(30):
        optimizer.zero_grad()
        loss(seed=step).backward()
        optimizer.step()
    with torch.no_grad():
        after = loss(seed=-1)
    assert before > 4 and after < before - 0.25, (before, after)  # prompt 3.85, prefix 3.14
