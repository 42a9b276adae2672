"""MinHash signatures, clustering, and the distributed dedup steps on Ray Data."""

import random

import numpy as np
import pytest
import ray

from rayllm.data.config import FuzzyDedupConfig, ParagraphDedupConfig, TokenizerConfig
from rayllm.data.dedup import (
    MinHasher,
    Removals,
    clusters,
    document_id,
    estimated_jaccard,
    exact_duplicates,
    near_duplicates,
    paragraph_duplicates,
)
from rayllm.data.tokenizer import train_tokenizer

WORDS = [f"w{i}" for i in range(2000)]


def essay(seed: int, length: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(length))


def mutate(text: str, rate: float, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) if rng.random() < rate else w for w in text.split())


def test_signature_estimates_jaccard():
    hasher = MinHasher(FuzzyDedupConfig(bands=128, rows=2))
    a, b = essay(1), mutate(essay(1), 0.05, 2)
    grams = [set(hasher.shingles(t).tolist()) for t in (a, b)]
    exact = len(grams[0] & grams[1]) / len(grams[0] | grams[1])
    assert abs(estimated_jaccard(hasher.signature(a), hasher.signature(b)) - exact) < 0.08
    assert estimated_jaccard(hasher.signature(a), hasher.signature(essay(3))) < 0.05
    assert hasher.signature("two words") is None


def test_clusters_are_connected_components():
    roots = clusters([(5, 3), (3, 9), (7, 8)])
    assert roots == {3: 3, 5: 3, 9: 3, 7: 7, 8: 7}


def test_fuzzy_dedup_keeps_one_per_cluster(ray_cluster):
    rows = []
    for family in range(6):
        base = essay(family)
        for copy in range(3 if family < 3 else 1):
            text = base if copy == 0 else mutate(base, 0.03, 100 * family + copy)
            rows.append({"id": 1000 * family + copy, "text": text})
    stats = near_duplicates(ray.data.from_items(rows), FuzzyDedupConfig(), partitions=2)
    assert stats["removed_ids"].tolist() == [1, 2, 1001, 1002, 2001, 2002]
    assert stats["fuzzy_removed"] == 6
    assert stats["fuzzy_cluster_sizes"] == {"3": 3}


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_tokenizer_kinds_round_trip(kind):
    texts = [essay(i, 50) for i in range(50)]
    tokenizer = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=600))
    assert len(tokenizer) <= 600 and tokenizer.eos_token == "<|endoftext|>"
    ids = tokenizer(texts[0])["input_ids"]
    assert tokenizer.decode(ids).split() == texts[0].split()
    assert np.all(np.array(ids) < len(tokenizer))


def test_paragraph_dedup_keeps_the_first_copy(ray_cluster):
    footer = "Subscribe to our newsletter for weekly updates on everything that happens in the town council."
    rows = [
        {"id": 1, "text": essay(1, 30) + "\n\n" + footer},
        {"id": 2, "text": essay(2, 30) + "\n\n" + footer + "\n\nshort line"},
        {"id": 3, "text": footer},
    ]
    docs = ray.data.from_items(rows)
    removals = Removals()
    removals.paragraph_ids, removals.paragraph_positions = paragraph_duplicates(
        docs, ParagraphDedupConfig(min_chars=50), partitions=2
    )
    assert removals.paragraph_ids.tolist() == [2, 3]
    texts = {
        row["id"]: row["text"]
        for row in docs.map_batches(removals.apply, batch_format="pyarrow").take_all()
    }
    assert texts[1].endswith(footer)
    assert texts[2] == essay(2, 30) + "\n\nshort line"
    assert 3 not in texts  # emptied, so gone


def test_exact_dedup_keeps_the_first_in_corpus_order(ray_cluster):
    """File order, then line: line 9 comes before line 10 (a string compare of "f:10" and
    "f:9" would say otherwise), and the first file's copy before a later file's."""
    rows = [
        {"id": document_id(0, 10), "hash": "aa"},
        {"id": document_id(0, 9), "hash": "aa"},
        {"id": document_id(1, 2), "hash": "aa"},
        {"id": document_id(1, 0), "hash": "bb"},
        {"id": document_id(2, 0), "hash": "bb"},
    ]
    removed = exact_duplicates(ray.data.from_items(rows), partitions=2)
    assert removed.tolist() == sorted([document_id(0, 10), document_id(1, 2), document_id(2, 0)])
    assert exact_duplicates(ray.data.from_items(rows[3:4]), partitions=2).size == 0
