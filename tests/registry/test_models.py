"""Real models through the registry: the trained decoder and the GGUF import."""

import pytest
import torch

from rayllm.model.config import ModelConfig
from rayllm.model.hf import save_hf_model
from rayllm.model.model import Transformer
from rayllm.registry.importers import import_gguf
from rayllm.registry.store import Registry


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    config = ModelConfig(
        vocab_size=320, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=96, max_seq_len=32
    )
    torch.manual_seed(1)
    model = Transformer(config).eval()
    save_hf_model(tmp_path / "hf", config, model.state_dict(), bos_token_id=0, eos_token_id=0)
    registry = Registry(f"memory://rayllm-roundtrip-{id(model)}")
    registry.publish("tiny", tmp_path / "hf", lineage={})
    _, folder = registry.local_path("tiny")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), loaded(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_gguf_import_of_the_builtin_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = Registry(str(tmp_path / "registry"))
    version = import_gguf(registry, "smollm2", "smollm2")
    assert version.lineage["source"]["kind"] == "gguf"
    assert version.lineage["architecture"] == "LlamaForCausalLM"
    _, folder = registry.local_path("smollm2:1")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
