"""EleutherAI's lm-evaluation-harness against a served rayllm app, through the harness's own
OpenAI-compatible chat-completions model type. Its task is written by rayllm from the held-out
chat questions (the ``qa`` task's, as a local JSON-lines dataset), so nothing is downloaded;
the harness scores the answers with its own exact match, a cross-check of rayllm's."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from rayllm.errors import RayllmError

TASK = "rayllm_chat_qa"


def task_definition(data_file: str, max_tokens: int) -> dict:
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": max_tokens, "do_sample": False},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": True,
            }
        ],
    }


def run_harness(
    endpoint: str,
    served: str,
    questions: list[tuple[str, str]],
    max_tokens: int,
    concurrency: int,
) -> dict:
    """The harness's exact match of ``served`` at ``endpoint`` on ``questions``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="rayllm-harness-") as folder:
        data = Path(folder) / "questions.jsonl"
        data.write_text(
            "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in questions)
        )
        (Path(folder) / f"{TASK}.yaml").write_text(
            yaml.safe_dump(task_definition(str(data), max_tokens))
        )
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ["OPENAI_API_KEY"] = os.environ.get("RAYLLM_API_KEY", "")  # the harness's name
        results = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args={
                "model": served,
                "base_url": f"{endpoint.rstrip('/')}/v1/chat/completions",
                "num_concurrent": concurrency,
                "max_retries": 3,
                "tokenized_requests": False,
            },
            tasks=[TASK],
            task_manager=TaskManager(include_path=folder),
            apply_chat_template=True,
            log_samples=False,
        )
    if not results or TASK not in results.get("results", {}):
        raise RayllmError(f"lm-evaluation-harness returned no results for {served} at {endpoint}")
    scores = results["results"][TASK]
    return {
        "exact_match": scores["exact_match,none"],
        "exact_match_stderr": scores.get("exact_match_stderr,none"),
        "examples": len(questions),
        "harness": f"lm-eval {lm_eval.__version__}",
    }
