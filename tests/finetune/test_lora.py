"""LoRA on rayllm's decoder: peft's adapters injected in place, saved in the layout transformers
and peft (and so vLLM) load against the Hugging Face base, and merged into full weights; all
three compute the same logits."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rayllm.model.config import ModelConfig
from rayllm.model.hf import read_hf_model, save_hf_model
from rayllm.model.model import Transformer
from rayllm.train.config import LoraSettings, TrainConfig
from rayllm.train.engine import build_model
from rayllm.train.lora import merged_state, save_adapter, trainable_parameters

SHAPE = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=96)


def test_an_adapter_saved_from_rayllm_is_the_same_model_in_peft_and_merged(tmp_path):
    torch.manual_seed(0)
    base = Transformer(SHAPE)
    save_hf_model(tmp_path / "base", SHAPE, base.state_dict(), bos_token_id=0, eos_token_id=0)
    settings = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    config = TrainConfig(model=SHAPE, init_from=str(tmp_path / "base"), lora=settings)
    model = build_model(config, torch.device("cpu"))  # the base's weights, adapters added
    per_layer = 4 * (64 + 64) + 4 * (64 + 32) + 4 * (96 + 64)
    assert trainable_parameters(model) == SHAPE.n_layers * per_layer
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    with torch.no_grad():  # peft starts B at zero; give the adapters something to add
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_(std=0.1)
    tokens = torch.randint(0, 64, (2, 12))
    ours = model(tokens)
    assert not torch.allclose(ours, base(tokens), atol=1e-3)

    save_adapter(model, settings, tmp_path / "adapter", base=str(tmp_path / "base"))
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(hf_base, tmp_path / "adapter")
    torch.testing.assert_close(peft_model(tokens).logits, ours, atol=1e-4, rtol=0)

    merged = Transformer(SHAPE)
    merged.load_state_dict(merged_state(model))
    torch.testing.assert_close(merged(tokens), ours, atol=1e-4, rtol=0)


def test_a_tied_hugging_face_head_is_read_as_a_copy_of_the_embedding(tmp_path):
    torch.manual_seed(0)
    state = Transformer(SHAPE).state_dict()
    state.pop("lm_head.weight")
    save_hf_model(tmp_path, SHAPE, state, bos_token_id=0, eos_token_id=0)
    shape, read = read_hf_model(str(tmp_path))
    assert shape == SHAPE
    assert torch.equal(read["lm_head.weight"], read["embed_tokens.weight"])


@pytest.mark.parametrize(
    "parallel",
    [{"strategy": "ddp", "tp": 2}, {"strategy": "ddp", "pp": 2}, {"strategy": "fsdp", "tp": 2}],
)
def test_qlora_under_tensor_or_pipeline_parallelism_is_refused(parallel):
    """Plain LoRA splits over tensor and pipeline ranks (tests/train/test_strategies.py); NF4
    weights do not."""
    TrainConfig(lora=LoraSettings(), parallel=parallel)
    with pytest.raises(ValueError, match="trains with parallel.strategy=ddp and tp = pp = 1"):
        TrainConfig(lora=LoraSettings(quantize_base=True), parallel=parallel)


def test_qlora_of_weights_not_in_whole_nf4_blocks_is_refused_before_any_worker():
    odd = {"dim": 32, "n_heads": 1, "n_kv_heads": 1, "ffn_dim": 33}  # 1,056 MLP weights
    ddp = {"strategy": "ddp"}
    TrainConfig(model=odd, lora=LoraSettings(), parallel=ddp)
    with pytest.raises(ValueError, match="gate_proj, up_proj and down_proj have 1056 weights"):
        TrainConfig(model=odd, lora=LoraSettings(quantize_base=True), parallel=ddp)


def test_unknown_target_modules_are_refused():
    with pytest.raises(ValueError, match="lora.target_modules"):
        LoraSettings(target_modules=["attn"])
