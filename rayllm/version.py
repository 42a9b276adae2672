"""Which rayllm wrote something: recorded in the manifests of models and registry versions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import rayllm


def code_version() -> str:
    """``rayllm 0.1.0 (abc1234)``: the package version and, in a git checkout, the commit."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(rayllm.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except OSError:
        commit = ""
    return f"rayllm {rayllm.__version__}" + (f" ({commit})" if commit else "")
