"""Held-out perplexity of a Hugging Face-format model on the validation shards.

It loads the model with ``transformers`` rather than rayllm's own class, so it also proves
the published version is a working Hugging Face model (an adapter merged into its base).
"""

from __future__ import annotations

import math

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayllm.data.shards import read_shard


def perplexity(
    registry: str,
    model: str,
    data: str,
    files: list[dict],
    batch_size: int = 16,
    max_rows: int = 512,
) -> dict:
    """Mean next-token loss over up to ``max_rows`` validation rows, and its exponential;
    ``model`` is a folder or a reference into ``registry``."""
    from rayllm.eval.models import load_model

    model, _ = load_model(registry, model)
    rows = np.concatenate([read_shard(data, f) for f in files])[:max_rows]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = torch.from_numpy(rows[start : start + batch_size].astype(np.int64))
            logits = model(chunk[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"
            )
            total += loss.item()
            count += chunk[:, 1:].numel()
    mean = total / count
    return {"val_loss": mean, "perplexity": math.exp(mean), "tokens": count}


def run_remote(registry: str, model: str, data: str, files: list[dict], **sizes: int) -> dict:
    """Run :func:`perplexity` (``sizes``: its batch_size and max_rows) as a Ray task off the
    driver process, on the driver's node (where a model folder would be)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=1, scheduling_strategy=here)(perplexity)
    return ray.get(task.remote(registry, model, data, files, **sizes))
