"""Held-out perplexity of a Hugging Face-format model on the validation shards.

It loads the model with ``transformers`` rather than rayllm's own class, so it also proves
the published version is a working Hugging Face model (an adapter merged into its base, a
quantized version decompressed). Rows of another tokenizer than the model's are re-tokenized.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayllm.cluster import task_result
from rayllm.compress.calibration import mean_loss, token_rows


def perplexity(
    registry: str, model: str, data: str, batch_size: int = 16, max_rows: int = 512
) -> dict:
    """Mean next-token loss over up to ``max_rows`` validation rows, and its exponential;
    ``model`` is a folder or a reference into ``registry``."""
    from rayllm.eval.models import load_model

    model, tokenizer = load_model(registry, model)
    rows = token_rows(data, "val", max_rows, tokenizer, "max_rows", required=1)
    return mean_loss(model, rows, batch_size)


def run_remote(registry: str, model: str, data: str, **sizes: int) -> dict:
    """Run :func:`perplexity` (``sizes``: its batch_size and max_rows) as a Ray task off the
    driver process, on the driver's node (where a model folder would be)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=1, scheduling_strategy=here)(perplexity)
    return task_result(task.remote(registry, model, data, **sizes))
