"""The curation stage end to end on Ray Data: every block on, a corpus with known faults."""

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayllm.config import build_config
from rayllm.data.config import DataConfig
from rayllm.data.pipeline import run
from rayllm.data.shards import load_manifest, read_shard, shard_dataset
from rayllm.errors import RayllmError

STORY = (
    "The river rose in the spring and the people of the valley moved their animals to the hills. "
    "When the water went down they came back to find that the fields were covered with new earth, "
    "and that year the harvest was the best that anyone could remember. The elders said that the "
    "flood had been a gift, and they marked the day of its coming with a feast for the whole town."
)


SUBJECTS = [
    "The farmer",
    "A traveller",
    "The old woman",
    "The miller",
    "A young clerk",
    "The priest",
    "The baker",
]
VERBS = ["walked to", "looked at", "spoke about", "dreamed of", "wrote to", "waited by", "sang of"]
OBJECTS = [
    "the bridge",
    "the market",
    "the school",
    "the harbour",
    "the mill",
    "the orchard",
    "the church",
]
ENDINGS = [
    "in the morning",
    "before the rain",
    "with a heavy heart",
    "and then went home",
    "for an hour",
]


def chapter(seed: int) -> str:
    rng = random.Random(seed)
    sentences = [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)} on day {rng.randrange(1000)}."
        for _ in range(12)
    ]
    return " ".join(sentences)


def corpus_lines() -> list[str]:
    docs = [chapter(i) for i in range(40)]
    docs[3] = docs[2].replace("on day", "upon day", 1)  # a near-duplicate of chapter 2
    docs.append(docs[5])  # an exact duplicate
    docs.append(
        "Der Fluss stieg im Frühling, und die Leute im Tal brachten ihre Tiere in die Berge. " * 4
    )
    docs.append(
        STORY + " Write to the mayor at mayor@valley.example or call +1 415-555-0132 today."
    )
    docs.append("buy now " * 80)
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(7, "{broken json")
    return lines


@pytest.mark.slow
def test_curation_explains_every_document(ray_cluster, tmp_path):
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(corpus_lines()))
    config = build_config(
        DataConfig,
        {
            "corpus": str(source),
            "output": str(tmp_path / "out"),
            "tokenizer": {"vocab_size": 400},
            "seq_len": 32,
            "val_fraction": 0.3,
            "fuzzy_dedup": {"threshold": 0.5},
            "gopher_repetition": {
                "enabled": False
            },  # the generated chapters repeat phrases on purpose
        },
    )
    result = run(config)
    manifest, stats = result.manifest, result.stats
    assert stats["documents_in"] == 45
    assert stats["dropped"]["read.invalid JSON"] == 1
    assert stats["dropped"]["language.not_en"] == 1
    assert stats["dropped"]["gopher_quality.stop_words"] == 1
    assert stats["columns"]["pii_email"] == 1 and stats["columns"]["pii_phone"] == 1
    assert stats["exact_duplicates"] == 1
    assert stats["fuzzy"]["fuzzy_removed"] == 1
    assert stats["documents_kept"] == 45 - 3 - 1 - 1
    assert stats["examples"]["language.not_en"][0]["source"].endswith("corpus.jsonl:43")
    assert stats["columns"]["language"]["en"] >= 40
    assert 0.5 < stats["columns"]["language_score"]["median"] <= 1.0
    curated = pq.read_table(tmp_path / "out" / "curated")
    assert curated.num_rows == 45
    assert {"language", "language_score", "pii_email", "drop"} <= set(curated.column_names)

    loaded = load_manifest(str(tmp_path / "out"))
    assert loaded == manifest
    rows = [read_shard(str(tmp_path / "out"), f) for f in manifest["shards"]["train"]]
    assert np.concatenate(rows).shape[1] == 33
    through_ray_data = np.stack(
        [r["data"] for r in shard_dataset(str(tmp_path / "out")).take_all()]
    )
    assert sorted(map(tuple, through_ray_data)) == sorted(map(tuple, np.concatenate(rows)))
    assert not list(tmp_path.glob("out.staging-*"))

    damaged = manifest["shards"]["train"][0]
    (tmp_path / "out" / damaged["path"]).write_bytes(b"not the shard it was")
    with pytest.raises(RayllmError, match=f"shard .*{damaged['path']} does not match the sha256"):
        read_shard(str(tmp_path / "out"), damaged)
    with pytest.raises(Exception, match=f"{damaged['path']} does not match the sha256"):
        shard_dataset(str(tmp_path / "out")).take_all()


def test_a_corpus_filtered_to_nothing_leaves_nothing_behind(ray_cluster, tmp_path):
    source = tmp_path / "spam.jsonl"
    source.write_text("\n".join(json.dumps({"text": "buy now " * 80}) for _ in range(5)))
    config = DataConfig(corpus=str(source), output=str(tmp_path / "out"))
    with pytest.raises(RayllmError, match="every one of the 5 documents .* filtered out"):
        run(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spam.jsonl"]


def test_max_documents_keeps_the_corpus_first_documents(ray_cluster, tmp_path):
    """A slice of the corpus is its first documents, the same on every run, whichever of the
    files read in parallel is read first."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(16):
        lines = [json.dumps({"text": chapter(1000 * part + n)}) for n in range(1000)]
        (corpus / f"part-{part:02}.jsonl").write_text("\n".join(lines))
    settings = {"tokenizer": {"vocab_size": 300}, "seq_len": 32, "val_fraction": 0.3}
    settings |= {
        "corpus": str(corpus),
        "max_documents": 3000,
        "gopher_repetition": {"enabled": False},  # the generated chapters repeat phrases
        "fuzzy_dedup": {"enabled": False},  # and are near-duplicates of each other
    }
    run(build_config(DataConfig, settings | {"output": str(tmp_path / "out")}))
    sources = set(pq.read_table(tmp_path / "out" / "curated").column("source").to_pylist())
    first = {
        f"{corpus}/part-{part:02}.jsonl:{line}" for part in range(3) for line in range(1, 1001)
    }
    assert sources == first
