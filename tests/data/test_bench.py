"""The data benchmarks' own parts: the shared input, and rayllm's side of the comparison."""

import json

import pytest

from rayllm.data.bench import MemorySampler, throughput, write_input


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


@pytest.mark.slow
def test_rayllm_side_of_the_datatrove_comparison(ray_cluster):
    with MemorySampler() as sampler:
        (row,) = throughput("bible", [1], datatrove=False)
    assert row["system"] == "rayllm" and row["documents"] == 1189
    assert 1000 < row["kept"] < 1189  # the rules and fuzzy dedup remove some chapters
    assert 0 < row["seconds"] < row["seconds_with_packing"]
    assert sampler.driver_peak > 0 and sampler.worker_name.startswith("ray::")
