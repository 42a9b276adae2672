"""The recovery fine-tune after a compression that removed or tied weights: a few steps of
next-token training of the compressed ``transformers`` model on training rows, in the compress
task (one process): the shape of LLM-Pruner's and SVD-LLM's short recovery runs."""

from __future__ import annotations

import torch

from rayllm.compress.config import RecoverySettings
from rayllm.progress import Stage
from rayllm.train.optim import warmup_cosine


def recover(model: torch.nn.Module, rows: torch.Tensor, settings: RecoverySettings) -> dict:
    """Train ``model`` for ``settings.steps`` steps on ``rows`` (cycled); returns the first and
    last steps' losses for the lineage. Shared weights are one parameter, trained once."""
    parameters = list(model.parameters())  # deduplicated: a shared weight is listed once
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    factor = warmup_cosine(settings.steps, max(1, settings.steps // 10), floor=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = []
    model.train()
    with Stage(f"compress: recovery, {settings.steps} steps") as stage:
        for step in range(settings.steps):
            start = step * settings.rows_per_step % len(rows)
            batch = rows[start : start + settings.rows_per_step]
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), batch[:, 1:].flatten()
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            if step % 10 == 0 or step == settings.steps - 1:
                print(f"recovery step {step + 1}/{settings.steps}: loss {losses[-1]:.4f}")
        stage.note(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    model.eval()
    return {"recovery": settings.model_dump(mode="json") | {"losses": [losses[0], losses[-1]]}}
