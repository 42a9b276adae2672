"""Training the learned quality filter once per config, cached on disk."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from pathlib import Path

import numpy as np

from rayllm.data.blocks.classifier import ClassifierConfig, QualityModel, synthesise_junk
from rayllm.data.blocks.normalise import normalise
from rayllm.data.corpora import resolve_source
from rayllm.data.readers import read_documents
from rayllm.errors import RayllmError
from rayllm.paths import cache_dir


def _sample(corpora: list[str], limit: int, seed: int) -> list[str]:
    texts = []
    for corpus in corpora:
        for url in resolve_source(corpus):
            texts += [
                normalise(d["text"])
                for d in read_documents(url, split="paragraph", text_field="text")
            ]
    texts = [t for t in texts if len(t.split()) >= 5]
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def quality_model(config: ClassifierConfig) -> QualityModel:
    """The trained model for ``config``, from the cache when it was trained before."""
    key = hashlib.sha256(json.dumps(config.model_dump(), sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir()) / "classifiers" / f"{key}.npz"
    if path.exists():
        saved = np.load(path)
        return QualityModel(saved["weights"], float(saved["bias"]))
    good = _sample(config.reference, config.max_documents, config.seed)
    bad = (
        _sample(config.junk, config.max_documents, config.seed)
        if config.junk
        else synthesise_junk(good, config.seed)
    )
    if not good or not bad:
        raise RayllmError(
            "the quality classifier needs documents on both sides; check data.classifier.reference / junk"
        )
    model = QualityModel().fit(good, bad, config.epochs, config.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:8]}.npz")
    np.savez(staging, weights=model.weights, bias=model.bias)
    staging.replace(path)  # a rename: another process never reads half a file
    return model
