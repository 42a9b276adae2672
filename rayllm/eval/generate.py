"""Answers to conversations, data-parallel on Ray: requests to a served endpoint (the served
app's replicas do the work, many requests in flight), or ``transformers``' greedy generate
in Ray tasks, each on a slice of the conversations."""

from __future__ import annotations

import asyncio

import numpy as np
import ray

from rayllm.client import AsyncClient
from rayllm.progress import console

Conversation = list[dict[str, str]]


def answers_from_endpoint(
    url: str, model: str, conversations: list[Conversation], max_tokens: int, concurrency: int
) -> list[str]:
    """Greedy answers of ``model`` at the OpenAI-compatible ``url`` (API key: $RAYLLM_API_KEY)."""

    async def run() -> list[str]:
        client = AsyncClient(url, model)
        limit = asyncio.Semaphore(concurrency)

        async def one(messages: Conversation) -> str:
            async with limit:
                return await client.chat(messages, max_tokens=max_tokens, temperature=0)

        try:
            return await asyncio.gather(*(one(m) for m in conversations))
        finally:
            await client.http.aclose()

    return asyncio.run(run())


def answers_in_tasks(
    registry: str, ref: str, conversations: list[Conversation], max_tokens: int, workers: int
) -> list[str]:
    """Greedy answers of the registry version ``ref``, from ``workers`` Ray tasks that each
    load it on their own node (an adapter on top of its base)."""
    task = ray.remote(num_cpus=1)(_generate)
    slices = [list(s) for s in np.array_split(np.arange(len(conversations)), workers) if len(s)]
    console.print(f"  generating {len(conversations)} answers in {len(slices)} Ray tasks")
    parts = ray.get(
        [task.remote(registry, ref, [conversations[i] for i in s], max_tokens) for s in slices]
    )
    return [answer for part in parts for answer in part]


def _generate(
    registry: str, ref: str, conversations: list[Conversation], max_tokens: int
) -> list[str]:
    import torch

    from rayllm.eval.models import load_model

    model, tokenizer = load_model(registry, ref)
    answers = []
    with torch.no_grad():
        for messages in conversations:
            prompt = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            output = model.generate(
                **prompt,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            new = output[0, prompt["input_ids"].shape[1] :]
            answers.append(tokenizer.decode(new, skip_special_tokens=True))
    return answers
