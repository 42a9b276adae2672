"""Which compressed versions vLLM serves, and where: refused before any replica starts."""

from __future__ import annotations

from rayllm.compress.config import RAYLLM_LAYOUTS
from rayllm.errors import RayllmError
from rayllm.registry.store import Version


def check_loadable(version: Version) -> None:
    """Refuse serving a version in a layout vLLM has no model class for (wherever it runs)."""
    method = version.lineage.get("compression", {}).get("method")
    if method in RAYLLM_LAYOUTS:
        raise RayllmError(
            f"{version.ref} is {RAYLLM_LAYOUTS[method]}, which no vLLM model class loads: "
            "score it with `rayllm eval` or `rayllm bench compress` (both run it in "
            "transformers), and serve its parent"
        )


def check_servable(version: Version, on_gpu: bool) -> None:
    """Refuse serving a version vLLM cannot load, or quantized by a scheme it has no kernel
    for where it would run."""
    check_loadable(version)
    compression = version.lineage.get("compression", {})
    if compression.get("quantization", {}).get("scheme") == "w8a16" and not on_gpu:
        raise RayllmError(
            f"{version.ref} is quantized w8a16 (int8 weights only), which vLLM's CPU build has "
            "no kernel for: serve it on GPUs, or quantize its parent with quantize.scheme=w8a8 "
            "or w4a16 for CPUs"
        )
