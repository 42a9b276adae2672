"""The registry from the command line: import, promote, rollback, list, verify, export."""

import json
import os
import subprocess
import sys

from rayllm.data.config import TokenizerConfig
from rayllm.data.tokenizer import save_tokenizer, train_tokenizer
from rayllm.model.config import ModelConfig
from rayllm.model.hf import save_hf_model
from rayllm.model.model import Transformer


def rayllm(*args: str, root) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayllm.cli", "registry", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAYLLM_REGISTRY": str(root), "COLUMNS": "200"},
    )


def test_registry_commands(tmp_path):
    config = ModelConfig(
        vocab_size=128, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16
    )
    save_hf_model(
        tmp_path / "hf", config, Transformer(config).state_dict(), bos_token_id=0, eos_token_id=0
    )
    tokenizer = train_tokenizer(["to be or not to be"] * 8, TokenizerConfig(vocab_size=300))
    save_tokenizer(tokenizer, tmp_path / "hf")
    root = tmp_path / "registry"
    assert rayllm("import", "tiny", str(tmp_path / "hf"), root=root).returncode == 0
    assert (
        rayllm("publish", "tiny", str(tmp_path / "hf"), "--parent", "tiny:1", root=root).returncode
        == 0
    )
    assert rayllm("promote", "tiny:1", "production", root=root).returncode == 0
    promoted = rayllm("promote", "tiny:2", "production", "--reason", "better", root=root)
    assert promoted.returncode == 0 and "1 -> 2" in promoted.stdout
    rolled = rayllm("rollback", "tiny", "production", root=root)
    assert rolled.returncode == 0 and "tiny@production -> 1" in rolled.stdout

    listed = json.loads(rayllm("list", "--json", root=root).stdout)
    assert listed == [{"model": "tiny", "versions": [1, 2], "aliases": {"production": 1}}]
    lineage = json.loads(rayllm("lineage", "tiny:2", "--json", root=root).stdout)
    assert [row["ref"] for row in lineage] == ["tiny:2", "tiny:1"]
    history = json.loads(rayllm("history", "tiny", "--json", root=root).stdout)
    moves = [(h["from"], h["to"], h["reason"]) for h in history]
    assert moves == [(None, 1, ""), (1, 2, "better"), (2, 1, "rollback from 2")]
    assert "files verified" in rayllm("verify", "tiny@production", root=root).stdout
    assert rayllm("export", "tiny:2", str(tmp_path / "out"), root=root).returncode == 0
    assert (tmp_path / "out" / "model.safetensors").exists()

    (root / "tiny" / "versions" / "2" / "model.safetensors").write_bytes(b"broken")
    broken = rayllm("verify", "tiny:2", root=root)
    assert broken.returncode == 2 and "model.safetensors" in broken.stderr
    bad_name = rayllm("import", "../escape", str(tmp_path / "hf"), root=root)
    assert bad_name.returncode == 2 and "not allowed" in bad_name.stderr


def test_a_folder_without_tokenizer_is_refused(tmp_path):
    config = ModelConfig(
        vocab_size=128, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16
    )
    save_hf_model(
        tmp_path / "hf", config, Transformer(config).state_dict(), bos_token_id=0, eos_token_id=0
    )
    done = rayllm("publish", "tiny", str(tmp_path / "hf"), root=tmp_path / "registry")
    assert done.returncode == 2 and "has no tokenizer" in done.stderr
    assert not (tmp_path / "registry").exists()
