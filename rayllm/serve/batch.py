"""Batch inference: a dataset of prompts through a registry version's vLLM engine on Ray Data,
completions out to Parquet.

``ray.data.llm`` runs the work as a chain of Ray Data stages (the chat template where rows
hold ``messages``, tokenizer, vLLM engine actors, detokenizer) with its own progress bars;
rayllm adds the registry version (its verified files, the same engine settings as a Serve
replica) and the write: the Parquet files are staged beside the output and published with a
``manifest.json`` (rows, tokens, version), so a reader never sees half a result.

Ray Data LLM loads the model from a path: the driver resolves the registry version to a
verified local copy, so the engine workers must run where that path exists (this node, or a
registry every node mounts).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from rayllm.errors import RayllmError
from rayllm.paths import MARKER, check_replaceable, staged_folder
from rayllm.progress import Stage
from rayllm.registry.store import Registry
from rayllm.serve.config import BatchConfig

COMPLETIONS = "completions"
"""The output's Parquet folder, beside its manifest.json."""
IN_PROCESS = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
"""A one-rank CPU engine computes in vLLM's engine-core process, as Ray Data asks for one rank
(its "uni" executor): vLLM's CPU platform spawns a worker process instead unless told so."""


@dataclass(frozen=True)
class BatchResult:
    output: str
    version: str
    rows: int
    output_tokens: int
    seconds: float


def read_prompts(url: str):
    """The input as a Ray Dataset: JSON lines for ``.json``/``.jsonl``, else Parquet."""
    import ray

    if url.endswith((".json", ".jsonl")):
        dataset = ray.data.read_json(url)
    else:
        dataset = ray.data.read_parquet(url)
    columns = set(dataset.columns())
    if not columns & {"prompt", "messages"}:
        raise RayllmError(
            f"batch.input {url} has columns {sorted(columns)}; give each row a 'prompt' "
            "(text to complete) or 'messages' (a chat)"
        )
    return dataset


def run(config: BatchConfig) -> BatchResult:
    import pyarrow.fs
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from rayllm.compress.servable import check_servable
    from rayllm.serve.app import check_ranks, engine_arguments
    from rayllm.serve.node_cpus import engine_node_cpus

    check_replaceable(config.output, config.overwrite, "batch.output", "output")
    registry = Registry(config.registry_root())
    on_gpu = ray.cluster_resources().get("GPU", 0) > 0 if config.use_gpu is None else config.use_gpu
    if config.tensor_parallel_size > 1 and not on_gpu:
        raise RayllmError(
            f"batch.tensor_parallel_size {config.tensor_parallel_size} needs GPUs (one per "
            "rank): Ray Data runs a CPU engine as one rank; set tensor_parallel_size=1, and "
            "engines or cpus_per_engine for more CPUs"
        )
    cpus = engine_node_cpus({"CPU": config.cpus_per_engine})
    version = registry.resolve(config.model)
    check_servable(version, on_gpu, cpus)
    check_ranks(registry, version, config.tensor_parallel_size)
    version, folder = registry.local_path(version.ref)
    prompts = read_prompts(config.input)
    chat = "messages" in prompts.columns()
    bundle = {"CPU": config.cpus_per_engine} | ({"GPU": 1} if on_gpu else {})
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=str(folder),
            engine_kwargs=engine_arguments(config, on_gpu, version.ref, cpus),
            placement_group_config={"bundles": [bundle] * config.tensor_parallel_size},
            batch_size=config.batch_size,
            concurrency=config.engines,
            chat_template_stage=chat,
            runtime_env=None if on_gpu else IN_PROCESS,
        ),
        preprocess=_with_sampling(config.max_tokens, config.temperature),
        postprocess=_completion(version.ref),
    )
    started = time.perf_counter()
    with (
        Stage(f"batch: {config.input} through {version.ref}") as stage,
        staged_folder(config.output) as (fs, staging),
    ):
        arrow_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
        processor(prompts).write_parquet(f"{staging}/{COMPLETIONS}", filesystem=arrow_fs)
        written = ray.data.read_parquet(f"{staging}/{COMPLETIONS}", filesystem=arrow_fs)
        rows, tokens = written.count(), int(written.sum("output_tokens") or 0)
        summary = {"version": version.ref, "input": config.input, "rows": rows}
        summary |= {"output_tokens": tokens, "seconds": time.perf_counter() - started}
        fs.pipe_file(f"{staging}/{MARKER}", json.dumps(summary, indent=2).encode())
        stage.note(f"{rows} rows, {tokens} tokens")
    return BatchResult(config.output, version.ref, rows, tokens, summary["seconds"])


def _with_sampling(max_tokens: int, temperature: float):
    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        sampling = {"max_tokens": max_tokens, "temperature": temperature}
        return row | {"sampling_params": sampling}

    return preprocess


def _completion(version: str):
    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        kept = {key: row[key] for key in ("prompt", "messages") if key in row}
        return kept | {
            "completion": row["generated_text"],
            "input_tokens": row["num_input_tokens"],
            "output_tokens": row["num_generated_tokens"],
            "version": version,
        }

    return postprocess
