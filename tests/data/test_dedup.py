"""MinHash signatures, clustering, and the distributed fuzzy dedup on Ray Data."""

import random

import numpy as np
import pytest
import ray

from rayllm.data.dedup import FuzzyDedupConfig, MinHasher, clusters, estimated_jaccard, fuzzy_dedup
from rayllm.data.tokenizer import TokenizerConfig, train_tokenizer

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
    kept, stats = fuzzy_dedup(ray.data.from_items(rows), FuzzyDedupConfig(), partitions=2)
    kept_ids = sorted(row["id"] for row in kept.take_all())
    assert kept_ids == [0, 1000, 2000, 3000, 4000, 5000]
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
    from rayllm.data.dedup import ParagraphDedupConfig, paragraph_dedup

    footer = "Subscribe to our newsletter for weekly updates on everything that happens in the town council."
    rows = [
        {"id": 1, "text": essay(1, 30) + "\n\n" + footer},
        {"id": 2, "text": essay(2, 30) + "\n\n" + footer + "\n\nshort line"},
        {"id": 3, "text": footer},
    ]
    kept, stats = paragraph_dedup(
        ray.data.from_items(rows), ParagraphDedupConfig(min_chars=50), partitions=2
    )
    texts = {row["id"]: row["text"] for row in kept.take_all()}
    assert texts[1].endswith(footer)
    assert texts[2] == essay(2, 30) + "\n\nshort line"
    assert 3 not in texts
    assert stats == {"paragraphs_removed": 2, "documents_emptied": 1}
