"""Which compressed versions vLLM serves, and where: refused before any replica starts."""

from __future__ import annotations

import platform
from pathlib import Path

from rayllm.compress.config import RAYLLM_LAYOUTS
from rayllm.errors import RayllmError
from rayllm.registry.store import Version


def cpu_flags() -> set[str]:
    """This machine's CPU features as the kernel lists them (none where it does not)."""
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()


def cpu_has_int4_kernel() -> bool:
    """Whether vLLM's CPU build has its int4 kernel here: on x86 it loads its AVX2 library on
    CPUs without AVX-512, and that library has none."""
    return platform.machine() not in ("x86_64", "AMD64") or "avx512f" in cpu_flags()


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
    if on_gpu:
        return
    scheme = version.lineage.get("compression", {}).get("quantization", {}).get("scheme")
    if scheme == "w8a16":
        raise RayllmError(
            f"{version.ref} is quantized w8a16 (int8 weights only), which vLLM's CPU build has "
            "no kernel for: serve it on GPUs, or quantize its parent with quantize.scheme=w8a8 "
            "or w4a16 (on AVX-512) for CPUs"
        )
    if scheme == "w4a16" and not cpu_has_int4_kernel():
        raise RayllmError(
            f"{version.ref} is quantized w4a16 (int4 weights), and vLLM's CPU build has its "
            "int4 kernel only for CPUs with AVX-512, which this one lacks: serve it on GPUs "
            "or AVX-512 CPUs, or quantize its parent with quantize.scheme=w8a8 for CPUs"
        )
