"""GGUF export of a small Llama version with a byte-level BPE vocabulary learnt from the
built-in Shakespeare corpus: written in float32, transformers loads back the same tokens and
logits (names, rotary row order and metadata right); the README's q8_0 line writes a file that
loads back with the same next tokens; bad exports are refused and leave no file."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayllm.compress.gguf import export_gguf
from rayllm.data.config import TokenizerConfig
from rayllm.data.corpora import resolve_source
from rayllm.data.tokenizer import save_tokenizer, train_tokenizer, with_chat_template
from rayllm.errors import RayllmError
from rayllm.registry.store import Registry
from tests.test_cli import rayllm, rayllm_ok
from tests.test_readme import block_with, commands


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    folder = tmp_path_factory.mktemp("gguf-model")
    texts = [Path(p).read_text(errors="replace")[:200_000] for p in resolve_source("shakespeare")]
    tokenizer = train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=512))
    save_tokenizer(with_chat_template(tokenizer), folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    store = Registry(str(tmp_path_factory.mktemp("gguf-registry")))
    store.publish("small", folder, {"architecture": "LlamaForCausalLM"})
    return store


def test_a_float32_gguf_loads_back_as_the_same_model(registry, tmp_path):
    check = export_gguf(registry, "small", tmp_path / "small.gguf", "f32")
    assert check["same_tokens"] and check["top1_agreement"] == 1.0
    assert check["max_logit_difference"] < 1e-4
    assert (
        check["version"] == "small:1" and check["bytes"] == (tmp_path / "small.gguf").stat().st_size
    )


def test_the_readme_q8_0_export_loads_back(registry, tmp_path):
    (export,) = [c for c in commands(block_with("--gguf q8_0")) if "--gguf" in c]
    args = [a.replace("smollm2", "small") for a in export]
    assert args[:3] == ["registry", "export", "small"]
    out = rayllm_ok(*args[:3], str(tmp_path / args[3]), *args[4:], "--root", registry.url)
    assert "exported small:1" in out and "loaded back with the same tokens" in out
    assert (tmp_path / args[3]).is_file()


def test_bad_exports_are_refused_and_leave_no_file(registry, tmp_path):
    taken = tmp_path / "taken.gguf"
    taken.write_text("")
    with pytest.raises(RayllmError, match="exists; choose a new file name"):
        export_gguf(registry, "small", taken)
    with pytest.raises(RayllmError, match="choose one of q8_0, f16, f32"):
        export_gguf(registry, "small", tmp_path / "q4.gguf", "q4_k")
    done = rayllm("registry", "export", "missing", str(tmp_path / "m.gguf"), "--gguf", "q8_0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]
