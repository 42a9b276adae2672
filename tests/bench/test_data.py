"""The data benchmarks' own parts: the shared input, the settings both systems get, and
rayllm's side of the comparison through the command line."""

import json
import os
import subprocess
import sys

import pytest

from rayllm.bench.data import SETTINGS, equivalent_config, write_input


def test_input_copies_are_near_not_exact_duplicates(tmp_path):
    size = write_input("bible", tmp_path, parts=3, copies=2)
    texts = [
        json.loads(line)["text"]
        for path in sorted(tmp_path.glob("*.jsonl"))
        for line in path.open()
    ]
    assert len(sorted(tmp_path.glob("*.jsonl"))) == 3
    assert size["documents"] == len(texts) == 2 * 1189
    assert texts[1189] == "Copy 1. " + texts[0]
    assert len(set(texts)) == len(texts)


def test_each_setting_reaches_rayllms_config_unchanged():
    for setting in SETTINGS.values():
        config = equivalent_config("in", "out", 2, setting)
        fuzzy = config.fuzzy_dedup
        assert (fuzzy.ngram, fuzzy.bands, fuzzy.rows, fuzzy.threshold) == (
            setting.ngram,
            setting.bands,
            setting.rows,
            setting.threshold,
        )
        assert config.c4.min_sentences == setting.c4_min_sentences
        assert not (config.language.enabled or config.pii.enabled or config.exact_dedup)
    assert SETTINGS["datatrove defaults"].threshold == 0  # datatrove confirms no candidates


@pytest.mark.slow
def test_rayllm_side_of_the_datatrove_comparison(tmp_path):
    """``rayllm bench data`` starts its own Ray with exactly the workers' CPUs."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "rayllm.cli", "bench", "data", "--copies", "1", "--workers", "2"]
        + ["--no-datatrove", "--setting", "datatrove defaults", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)  # stdout holds the JSON alone
    assert [(r["system"], r["setting"]) for r in rows] == [("rayllm", "datatrove defaults")]
    for row in rows:
        assert row["documents"] == 1189 and row["workers"] == 2
        assert 0 < row["seconds_without_tokenizer_and_packing"] < row["seconds"]
        assert row["kept_per_stage"]["fuzzy_dedup"] == row["kept"] < 1189
        assert row["kept_per_stage"]["gopher_quality"] >= row["kept"]
