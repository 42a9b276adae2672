"""The decoder: causal, Hugging Face-compatible, and refusing shapes vLLM cannot serve."""

import pytest
import torch
from pydantic import ValidationError

from rayllm.model.config import ModelConfig
from rayllm.model.hf import save_hf_model
from rayllm.model.model import Transformer

TINY = ModelConfig(
    vocab_size=300, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=96, max_seq_len=32
)


def test_is_causal():
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    tokens = torch.randint(0, 300, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 300
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_parameter_count_matches_formula():
    assert TINY.num_params() == sum(p.numel() for p in Transformer(TINY).parameters())


def test_transformers_loads_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    save_hf_model(tmp_path, TINY, model.state_dict(), bos_token_id=0, eos_token_id=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_unservable_head_size_is_refused():
    with pytest.raises(ValidationError, match="cannot be served by vLLM"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=2)
