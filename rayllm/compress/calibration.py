"""Token rows from the curation stage's shards, in a model's own tokens: what compression
calibrates on (the training split) and measures its held-out loss on (the validation split)."""

from __future__ import annotations

import math

import numpy as np
import torch

from rayllm.data.shards import load_manifest, read_shard
from rayllm.data.tokenizer import load_tokenizer
from rayllm.errors import RayllmError


def token_rows(
    data: str, split: str, count: int, tokenizer, what: str, required: int | None = None
) -> torch.Tensor:
    """The first ``count`` rows of the shard set's ``split`` (``seq_len + 1`` tokens each) as ids of
    ``tokenizer``; rows of another tokenizer are decoded and re-tokenized into rows of the same
    length. Fewer than ``required`` rows (default: ``count``) is an error naming ``what`` asked
    for them."""
    manifest = load_manifest(data)
    rows, have = [], 0
    for entry in manifest["shards"][split]:
        if have >= count:
            break
        rows.append(read_shard(data, entry))
        have += len(rows[-1])
    shard_tokenizer = load_tokenizer(f"{data.rstrip('/')}/{manifest['tokenizer']}")
    width = rows[0].shape[1] if rows else manifest["seq_len"] + 1  # inputs and their targets
    if shard_tokenizer.get_vocab() == tokenizer.get_vocab():
        tokens = np.concatenate(rows)[:count] if rows else np.zeros((0, width))
    else:
        tokens = _retokenized(rows, shard_tokenizer, tokenizer, count, width)
    if len(tokens) < (count if required is None else required):
        raise RayllmError(
            f"{data} has {len(tokens)} {split} rows of {width} tokens, fewer than "
            f"the {count if required is None else required} {what} asks for: lower it, or "
            "curate more text (rayllm data)"
        )
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64))


def _retokenized(rows, shard_tokenizer, tokenizer, count: int, width: int) -> np.ndarray:
    """The shard rows' text in ``tokenizer``'s ids, documents joined by its end-of-text token
    and cut into rows of ``width``."""
    stream: list[int] = []
    for row in np.concatenate(rows) if rows else []:
        text = shard_tokenizer.decode(row.tolist(), skip_special_tokens=True)
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
        if len(stream) >= count * width:
            break
    whole = len(stream) // width
    return np.array(stream[: whole * width]).reshape(whole, width)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean next-token loss of a ``transformers`` causal LM over ``rows``, and its exponential."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        logits = model(chunk[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"
        ).item()
        count += chunk[:, 1:].numel()
    return {"val_loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


@torch.no_grad()
def calibration_pass(
    model: torch.nn.Module, rows: torch.Tensor, batch_size: int, handles: list
) -> None:
    """Run ``model`` over ``rows`` for the hooks behind ``handles`` to record, then remove
    them (also when the pass fails)."""
    try:
        for start in range(0, len(rows), batch_size):
            model(rows[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
