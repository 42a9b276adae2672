"""A learned quality filter: logistic regression on hashed word n-grams, reference vs junk.

The paper's second kind of quality filtering (after the heuristic rules): a small classifier
trained to tell reference-quality text from junk, as GPT-3 and the Pile did with fastText-style
models. rayllm trains its own on the CPU in seconds: positives are documents of reference
corpora (by default the built-in Bible and Shakespeare), negatives are junk made from them
(word salad, character noise, link and menu lists, repeated spam lines) unless a junk corpus
is given. Documents scoring below ``threshold`` are dropped; the score is recorded.
"""

from __future__ import annotations

import random
import re
import string

import numpy as np
import xxhash

from rayllm.config import StageConfig
from rayllm.data.blocks.base import Block, Column, Document

FEATURES = 1 << 18
_TOKEN = re.compile(r"\w+|[^\w\s]")


class ClassifierConfig(StageConfig):
    enabled: bool = False
    reference: list[str] = ["bible", "shakespeare"]
    """Corpora of good text (built-in names, paths or URLs)."""
    junk: list[str] = []
    """Corpora of bad text; empty means junk synthesised from the reference."""
    threshold: float = 0.5
    max_documents: int = 4000
    """Documents drawn from each side for training."""
    epochs: int = 8
    seed: int = 0


def features(text: str) -> np.ndarray:
    """Indices of hashed lower-cased unigrams and bigrams (a bag, duplicates allowed)."""
    tokens = _TOKEN.findall(text.lower())[:2000]
    grams = tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]
    return np.fromiter(
        (xxhash.xxh32_intdigest(g.encode()) % FEATURES for g in grams),
        dtype=np.int64,
        count=len(grams),
    )


def synthesise_junk(reference: list[str], seed: int) -> list[str]:
    """Four kinds of junk, each built from the reference's own words so style alone cannot tell."""
    rng = random.Random(seed)
    words = [w for text in reference for w in text.split()]
    junk = []
    for index, text in enumerate(reference):
        length = max(20, len(text.split()))
        kind = index % 4
        if kind == 0:  # word salad
            junk.append(" ".join(rng.choice(words) for _ in range(length)))
        elif kind == 1:  # character noise
            junk.append(
                "".join(
                    rng.choice(string.ascii_letters + string.digits + "#@$%&*/\\|")
                    for _ in range(5 * length)
                )
            )
        elif kind == 2:  # link and menu lists
            junk.append(
                "\n".join(
                    f"Home | {rng.choice(words)} | Login | http://example.com/{rng.randrange(10**6)}"
                    for _ in range(length // 5 + 1)
                )
            )
        else:  # repeated spam
            line = " ".join(rng.choice(words) for _ in range(6)) + " click here buy now"
            junk.append("\n".join([line] * (length // 8 + 1)))
    return junk


class QualityModel:
    """Logistic regression over :func:`features`, trained by mini-batch gradient descent."""

    def __init__(self, weights: np.ndarray | None = None, bias: float = 0.0):
        self.weights = np.zeros(FEATURES, np.float32) if weights is None else weights
        self.bias = bias

    def score(self, text: str) -> float:
        index = features(text)
        logit = self.bias + (self.weights[index].sum() / np.sqrt(max(1, len(index))))
        return float(1 / (1 + np.exp(-logit)))

    def fit(
        self, good: list[str], bad: list[str], epochs: int, seed: int, rate: float = 0.5
    ) -> QualityModel:
        samples = [(features(t), 1.0) for t in good] + [(features(t), 0.0) for t in bad]
        rng = random.Random(seed)
        for _ in range(epochs):
            rng.shuffle(samples)
            for index, label in samples:
                norm = np.sqrt(max(1, len(index)))
                logit = self.bias + self.weights[index].sum() / norm
                error = 1 / (1 + np.exp(-logit)) - label
                np.add.at(self.weights, index, -rate * error / norm)
                self.bias -= rate * error * 0.1
        return self


class QualityClassifier(Block):
    name = "classifier"
    columns = {"quality_score": Column(None, "distribution")}

    def __init__(self, config: ClassifierConfig, model: QualityModel):
        self.threshold = config.threshold
        self.model = model

    def apply(self, doc: Document) -> str | None:
        doc["quality_score"] = score = self.model.score(doc["text"])
        return "low_score" if score < self.threshold else None
