"""The compression benchmark: each method on the same source version and the same held-out
text, in one run. Per result: weights on disk, held-out loss and perplexity, seconds to
compress, and decode tokens/s when it is served (by rayllm's app, or vLLM's own server) under
the same load as the source, with ratios against the source.

The source is copied into the benchmark's own registry (``$RAYLLM_CACHE/bench/registry``)
and the results are published there, so the user's registry gets nothing it did not ask for.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import yaml
from pydantic import ValidationError

from rayllm.bench.load import Load
from rayllm.bench.serve import bench_registry
from rayllm.bench.serve import benchmark as serve_benchmark
from rayllm.compress.config import RAYLLM_LAYOUTS, CompressConfig
from rayllm.compress.runner import CompressResult
from rayllm.compress.task import compress_version
from rayllm.config import describe_validation_error
from rayllm.errors import RayllmError
from rayllm.registry.importers import import_folder
from rayllm.registry.store import Registry, default_registry

METHODS = (
    "method=quantize,quantize.algorithm=gptq",
    "method=quantize,quantize.algorithm=rtn",
    "method=quantize,quantize.scheme=w8a8",
    "method=prune,prune.structure=channels,prune.sparsity=0.25",
    "method=prune,prune.structure=layers,prune.sparsity=0.2",
)
"""The default comparison: int4 by GPTQ and by rounding, int8 weights and activations, a
quarter of the MLP channels, a fifth of the layers."""


def parse_method(text: str) -> dict[str, Any]:
    """``method=prune,prune.sparsity=0.25`` -> the compress settings it names (nested)."""
    settings: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise RayllmError(f"--method {text!r}: give comma-separated KEY=VALUE settings")
        *path, last = key.strip().split(".")
        node = settings
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return settings


def benchmark(
    source: str,
    registry_root: str | None,
    data: str,
    methods: list[str],
    group_size: int | None,
    sizes: dict[str, int],
    load: Load,
    system: str,
    serve_settings: dict[str, Any],
    prompt_words: int,
) -> dict[str, Any]:
    """Compress ``source`` by every method (``sizes``: the calibration and held-out rows; in
    this process, on all its CPUs), then serve the
    source and every result in turn with ``system`` under ``load``; one row per version, the
    source's first."""
    bench = Registry(bench_registry())
    base = {"registry": bench.url, "data": data, "cpus": os.cpu_count() or 1}
    configs = []
    for text in methods:
        settings = parse_method(text)
        quantize = settings.setdefault("quantize", {})
        if quantize.get("scheme", "w4a16") != "w8a8":  # w8a8 is per channel
            quantize.setdefault("group_size", group_size)
        try:
            config = CompressConfig.model_validate(base | sizes | settings)
        except ValidationError as err:
            raise RayllmError(describe_validation_error(err, f"--method {text}")) from None
        if config.method in RAYLLM_LAYOUTS and system != "hf generate":
            raise RayllmError(
                f"--method {text}: its result is {RAYLLM_LAYOUTS[config.method]}, which vLLM "
                f"cannot serve, so {system!r} cannot measure it; measure every row with "
                "--system 'hf generate'"
            )
        configs.append((text, config))
    ref = _copied_source(Registry(registry_root or default_registry()), source, bench)
    results = [
        (text, CompressResult(**compressed_here(config.model_copy(update={"source": ref}))))
        for text, config in configs
    ]
    first = results[0][1]  # every result measured the same source on the same rows
    source_row = {
        "method": "source",
        "version": ref,
        "bytes": first.bytes_before,
        "val_loss": first.loss_before,
    }
    rows: list[dict[str, Any]] = [source_row]
    for text, result in results:
        rows.append(
            {
                "method": text,
                "version": result.version,
                "bytes": result.bytes_after,
                "val_loss": result.loss_after,
                "compress_seconds": result.seconds,
            }
        )
    for row in rows:
        served = serve_benchmark(
            bench.url, row["version"], [load], [system], prompt_words, serve_settings, load.requests
        )
        row["output_tokens_per_s"] = served["rows"][0]["output_tokens_per_s"]
        row["tpot_p50_ms"] = served["rows"][0].get("tpot_p50_ms")
    for row in rows:
        row["perplexity"] = math.exp(row["val_loss"])
        row["size_vs_source"] = row["bytes"] / source_row["bytes"]
        row["perplexity_vs_source"] = row["perplexity"] / math.exp(source_row["val_loss"])
        row["speed_vs_source"] = row["output_tokens_per_s"] / source_row["output_tokens_per_s"]
    return {"source": ref, "registry": bench.url, "data": data, "load": load.name, "rows": rows}


def compressed_here(config: CompressConfig) -> dict:
    """Compress in this process (distillation: on Ray Train's workers, as ``rayllm compress``
    does), so the seconds measured are the method's, not a task's start."""
    if config.method == "distill":
        from rayllm.compress.distill import distill_version

        return distill_version(config)
    return compress_version(config)


def _copied_source(registry: Registry, source: str, bench: Registry) -> str:
    """``source`` as a version of the benchmark's registry, copied there once."""
    version = registry.resolve(source)
    name = f"{version.name}-{version.version}"
    if name in bench.models():
        return f"{name}:{bench.versions(name)[-1]}"
    with tempfile.TemporaryDirectory(prefix="rayllm-bench-") as folder:
        registry.export(version.ref, folder)
        return import_folder(bench, name, folder).ref
