"""Which compressed versions vLLM serves, and where: refused before any replica starts."""

from __future__ import annotations

from rayllm.compress.config import RAYLLM_LAYOUTS
from rayllm.errors import RayllmError
from rayllm.registry.store import Version
from rayllm.serve.node_cpus import NodeCpus


def check_loadable(version: Version) -> None:
    """Refuse serving a version in a layout vLLM has no model class for (wherever it runs)."""
    method = version.lineage.get("compression", {}).get("method")
    if method in RAYLLM_LAYOUTS:
        raise RayllmError(
            f"{version.ref} is {RAYLLM_LAYOUTS[method]}, which no vLLM model class loads: "
            "score it with `rayllm eval` or `rayllm bench compress` (both run it in "
            "transformers), and serve its parent"
        )


def check_servable(version: Version, on_gpu: bool, cpus: NodeCpus) -> None:
    """Refuse serving a version vLLM cannot load, or quantized by a scheme it has no kernel
    for where it would run (on GPUs, or on CPUs with the features ``cpus``)."""
    check_loadable(version)
    if on_gpu:
        return
    scheme = version.lineage.get("compression", {}).get("quantization", {}).get("scheme")
    if scheme == "w8a16":
        raise RayllmError(
            f"{version.ref} is quantized w8a16 (int8 weights only), which vLLM's CPU build has "
            "no kernel for: serve it on GPUs, or quantize its parent with quantize.scheme=w8a8 "
            "or w4a16 (on AVX-512) for CPUs"
        )
    if scheme == "w4a16" and not cpus.has_int4_kernel:
        raise RayllmError(
            f"{version.ref} is quantized w4a16 (int4 weights), and vLLM's CPU build has its "
            f"int4 kernel only for CPUs with AVX-512, which {cpus.where} lack: serve it on "
            "GPUs or AVX-512 CPUs (replica_resources can pick their nodes), or quantize its "
            "parent with quantize.scheme=w8a8 for CPUs"
        )
