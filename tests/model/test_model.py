"""The decoder: causal, Hugging Face-compatible (its head tied to the embedding or not, its
attention heads spanning dim or less), and refusing shapes vLLM cannot serve."""

import pytest
import torch
from pydantic import ValidationError

from rayllm.model.config import ModelConfig
from rayllm.model.hf import read_hf_model, save_hf_model, weights_dtype
from rayllm.model.model import Transformer

TINY = ModelConfig(
    vocab_size=300, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=96, max_seq_len=32
)
TIED = TINY.model_copy(update={"tie_embeddings": True})
PRUNED = TINY.model_copy(update={"n_heads": 1, "head_dim": 32})
"""A model that lost a head to pruning: its heads keep their width, spanning half of dim."""
SHAPES = pytest.mark.parametrize("shape", [TINY, TIED, PRUNED], ids=["untied", "tied", "pruned"])


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


@SHAPES
def test_parameter_count_matches_formula(shape):
    assert shape.num_params() == sum(p.numel() for p in Transformer(shape).parameters())


def test_a_tied_head_is_the_embedding_and_costs_the_same_flops():
    model = Transformer(TIED)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert TIED.num_params() == TINY.num_params() - 300 * 64
    assert TIED.flops_per_token(32) == TINY.flops_per_token(32)


@SHAPES
def test_transformers_loads_identical_logits(tmp_path, shape):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = Transformer(shape).eval()
    save_hf_model(tmp_path, shape, model.state_dict(), bos_token_id=0, eos_token_id=0)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        names = list(saved.keys())
    assert ("lm_head.weight" in names) is not shape.tie_embeddings  # a tied head stored once
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings is shape.tie_embeddings
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    read_shape, state = read_hf_model(str(tmp_path))
    assert read_shape == shape
    again = Transformer(read_shape)
    again.load_state_dict(state)
    assert (again.lm_head.weight is again.embed_tokens.weight) is shape.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(tokens), model(tokens))


def test_weights_are_saved_in_the_dtype_asked_and_read_back_as_it(tmp_path):
    from safetensors.torch import load_file

    state = Transformer(TINY).state_dict()
    save_hf_model(tmp_path, TINY, state, bos_token_id=0, eos_token_id=0, dtype=torch.bfloat16)
    assert weights_dtype(tmp_path) == torch.bfloat16
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    save_hf_model(tmp_path / "fp32", TINY, state, bos_token_id=0, eos_token_id=0)
    assert weights_dtype(tmp_path / "fp32") == torch.float32


def test_unservable_head_size_is_refused():
    with pytest.raises(ValidationError, match="cannot be served by vLLM"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValidationError, match="head size head_dim = 48 cannot be served"):
        ModelConfig(dim=64, n_heads=1, n_kv_heads=1, head_dim=48)
