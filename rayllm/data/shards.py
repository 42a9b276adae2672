"""A finished shard set: its manifest, and its shards read back with their sha256 checked.

``rayllm data`` writes ``<output>/manifest.json`` last; a folder without it is not a shard set.
Every reader (training, evaluation, ``shard_dataset``) checks each shard against the sha256
the manifest recorded, so a damaged or replaced shard is named instead of trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rayllm.errors import RayllmError
from rayllm.paths import absolute_url, cache_dir, filesystem, is_local

MANIFEST = "manifest.json"


def load_manifest(url: str) -> dict[str, Any]:
    """The manifest of a finished shard set, or a clear error when there is none."""
    fs, path = filesystem(url)
    if not fs.exists(f"{path}/{MANIFEST}"):
        raise RayllmError(
            f"{url} holds no finished token shards (no {MANIFEST}); run `rayllm data` first "
            "or point train.data at the output of a finished data run"
        )
    with fs.open(f"{path}/{MANIFEST}") as handle:
        return json.load(handle)


def manifest_sha256(url: str) -> str:
    """The sha256 of a shard set's manifest: names exactly which data a model was trained on."""
    fs, path = filesystem(url)
    return hashlib.sha256(fs.cat_file(f"{path}/{MANIFEST}")).hexdigest()


def decode_shard(payload: bytes, entry: dict[str, Any], where: str) -> np.ndarray:
    """The rows of one shard, after checking its bytes against the manifest's sha256."""
    if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
        raise _damaged(where)
    return np.load(io.BytesIO(payload), allow_pickle=False)


def read_shard(data: str, entry: dict[str, Any]) -> np.ndarray:
    """Load the shard ``entry`` (one item of ``manifest["shards"][split]``) of the set at ``data``."""
    fs, path = filesystem(data)
    where = f"{data.rstrip('/')}/{entry['path']}"
    try:
        payload = fs.cat_file(f"{path}/{entry['path']}")
    except FileNotFoundError:
        raise _missing(where) from None
    return decode_shard(payload, entry, where)


def open_shard(data: str, entry: dict[str, Any]) -> np.ndarray:
    """The shard ``entry`` memory-mapped: its rows are read from disk as they are used, so a
    reader never holds the whole set in memory. A shard on object storage is first copied
    into the local cache (once, named by its sha256); either way its sha256 is checked."""
    fs, path = filesystem(data)
    where = f"{data.rstrip('/')}/{entry['path']}"
    if is_local(data):
        local = Path(path) / entry["path"]
    else:
        local = cache_dir() / "shards" / f"{entry['sha256']}.npy"
    if not local.exists():
        if is_local(data):
            raise _missing(where)
        _download(fs, f"{path}/{entry['path']}", local, where)
    with local.open("rb") as handle:
        matches = hashlib.file_digest(handle, "sha256").hexdigest() == entry["sha256"]
    if not matches:
        if not is_local(data):
            local.unlink()  # a bad download: fetch it again next time
        raise _damaged(where)
    return np.load(local, mmap_mode="r", allow_pickle=False)


def _download(fs, remote: str, local: Path, where: str) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_suffix(f".{os.getpid()}.part")
    try:
        fs.get_file(remote, str(partial))
    except FileNotFoundError:
        raise _missing(where) from None
    partial.replace(local)


def _missing(where: str) -> RayllmError:
    return RayllmError(f"shard {where} is missing; re-run `rayllm data` to rebuild the shard set")


def _damaged(where: str) -> RayllmError:
    return RayllmError(
        f"shard {where} does not match the sha256 in its manifest: it is damaged or was "
        "replaced; re-run `rayllm data` to rebuild the shard set"
    )


def _decode_batch(batch: pa.Table, entries: dict[str, dict[str, Any]]) -> pa.Table:
    rows = [
        decode_shard(payload, entries[path.rsplit("/", 1)[-1]], path)
        for path, payload in zip(
            batch.column("path").to_pylist(), batch.column("bytes").to_pylist(), strict=True
        )
    ]
    stacked = np.concatenate(rows) if rows else np.empty((0, 0), np.uint16)
    return pa.table({"data": list(stacked)})


def shard_dataset(url: str, split: str = "train") -> ray.data.Dataset:
    """A finished shard set's sequences as a Ray Data dataset, one row of ``seq_len + 1``
    tokens per sequence in column ``data``: for Ray Train's dataset ingestion, or any Ray
    Data job over the tokens. Each shard is checked against its sha256 as it is read."""
    manifest = load_manifest(url)
    root = absolute_url(url).rstrip("/")
    entries = {entry["path"]: entry for entry in manifest["shards"][split]}
    return ray.data.read_binary_files(
        [f"{root}/{path}" for path in entries], include_paths=True
    ).map_batches(_decode_batch, fn_kwargs={"entries": entries}, batch_format="pyarrow")
