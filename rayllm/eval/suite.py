"""``rayllm eval``: each task of the config run against one model, its results returned and
recorded in the registry version's manifest (where the promotion gate reads them)."""

from __future__ import annotations

from rayllm.errors import RayllmError
from rayllm.eval.config import EvalConfig
from rayllm.eval.generate import answers_from_endpoint, answers_in_tasks
from rayllm.eval.harness import run_harness
from rayllm.eval.perplexity import run_remote
from rayllm.eval.prompts import final_answer, question_messages
from rayllm.eval.safety import evaluation_prompts
from rayllm.eval.scores import answer_scores, refusal_scores
from rayllm.finetune.examples import Conversation, held_out_split, read_conversations
from rayllm.paths import absolute_url
from rayllm.progress import Stage
from rayllm.registry.store import Version


def run(config: EvalConfig) -> dict[str, dict]:
    config = config.with_work_paths()
    version = config.version()
    name = version.ref if version else config.required_model()
    results = {}
    for task in config.tasks:
        with Stage(f"eval {task}: {name}") as stage:
            scores = TASKS[task](config, version)
            stage.note(", ".join(f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, float)))
        results[config.result_key(task)] = scores
    if version and config.record:
        config.store().record_evaluations(version, results)
    return results


def perplexity(config: EvalConfig, version: Version | None) -> dict:
    sizes = {"batch_size": config.batch_size, "max_rows": config.max_rows}
    source = version.ref if version else str(config.model_folder()[0].resolve())
    data = absolute_url(config.data)
    return run_remote(config.store().url, source, data, **sizes) | {"data": data}


def held_out_questions(config: EvalConfig) -> tuple[list[Conversation], list[Conversation]]:
    """The held-out conversations asked (at most ``max_examples``), and the training ones."""
    conversations = read_conversations(config.qa_data)
    held, kept = held_out_split(len(conversations), config.held_out, config.seed)
    asked = [conversations[i] for i in held[: config.max_examples]]
    return asked, [conversations[i] for i in kept]


def qa(config: EvalConfig, version: Version | None) -> dict:
    """The held-out conversations' last answers, asked with the config's prompting."""
    asked, training = held_out_questions(config)
    shown = training[: config.shots]
    demonstrations = [(c[-2]["content"], c[-1]["content"]) for c in shown]
    prompts = [
        c[:-2] + question_messages(c[-2]["content"], demonstrations, config.chain_of_thought)
        for c in asked
    ]
    answers = generated(config, version, prompts)
    finals = [final_answer(a, config.chain_of_thought) for a in answers]
    return answer_scores(finals, [c[-1]["content"] for c in asked]) | {
        "data": config.qa_data,
        "shots": config.shots,
        "chain_of_thought": config.chain_of_thought,
    }


def harness(config: EvalConfig, version: Version | None) -> dict:
    """lm-evaluation-harness on the held-out questions, through the endpoint."""
    if not config.endpoint:
        raise RayllmError("the harness task asks a served app: set eval.endpoint to its URL")
    asked, _ = held_out_questions(config)
    questions = [(c[-2]["content"], c[-1]["content"]) for c in asked]
    served = config.served_model or served_name(version, config.required_model())
    return run_harness(config.endpoint, served, questions, config.max_tokens, config.concurrency)


def safety(config: EvalConfig, version: Version | None) -> dict:
    prompts = evaluation_prompts()
    answers = generated(config, version, [[{"role": "user", "content": p}] for p, _ in prompts])
    return refusal_scores(answers, [refuse for _, refuse in prompts])


def generated(config: EvalConfig, version: Version | None, prompts: list) -> list[str]:
    if config.endpoint:
        served = config.served_model or served_name(version, config.required_model())
        return answers_from_endpoint(
            config.endpoint, served, prompts, config.max_tokens, config.concurrency
        )
    source = version.ref if version else str(config.model_folder()[0].resolve())
    return answers_in_tasks(config.store().url, source, prompts, config.max_tokens, config.workers)


def served_name(version: Version | None, model: str) -> str:
    """The name an app serves a version under by default: its model name, or for an adapter
    ``base:adapter:N`` (the multi-LoRA path's)."""
    if version is None:
        return model
    if "adapter" in version.lineage:
        return f"{version.lineage['parent'].split(':')[0]}:{version.ref}"
    return version.name


TASKS = {"perplexity": perplexity, "qa": qa, "safety": safety, "harness": harness}
