"""Where rayllm reads and writes: URLs every process reads the same way, the cache, and
publishing a finished folder so that readers never see half of it."""

from __future__ import annotations

import fcntl
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from rayllm.errors import RayllmError

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
"""fsspec protocols whose filesystem ships as a rayllm extra (``pip install 'rayllm[s3]'``)."""


def cache_dir() -> Path:
    """rayllm's cache root: ``$RAYLLM_CACHE`` or ``~/.cache/rayllm``."""
    return Path(os.environ.get("RAYLLM_CACHE", Path.home() / ".cache" / "rayllm"))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing): processes of one machine that
    fill the same cache entry at once take turns, and the later ones find it filled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def absolute_url(url: str) -> str:
    """Local paths become absolute (workers do not share the driver's working directory)."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def is_local(url: str) -> bool:
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol in (None, "file", "local")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of ``url``; an unknown protocol, a missing extra or a
    bucket that does not exist is a user error naming the fix."""
    protocol = fsspec.core.split_protocol(url)[0]
    try:
        fs, path = fsspec.core.url_to_fs(absolute_url(url))
    except ValueError as err:
        raise RayllmError(
            f"{url}: unknown storage protocol {protocol!r} ({err}); use a local path or an "
            "fsspec URL such as s3://bucket/prefix or gs://bucket/prefix"
        ) from None
    except ImportError:
        extra = EXTRAS.get(protocol or "", protocol)
        raise RayllmError(
            f"{url}: the {protocol}:// filesystem is not installed; pip install 'rayllm[{extra}]'"
        ) from None
    if protocol in EXTRAS:
        bucket = path.split("/", 1)[0]
        try:
            reachable = fs.exists(bucket)
        except (OSError, PermissionError) as err:
            raise RayllmError(f"{url}: cannot reach bucket {bucket!r} ({err})") from None
        if not reachable:
            raise RayllmError(
                f"{url}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                "create it or fix the URL"
            )
    return fs, path


def parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/"))


def ensure_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Local disks need folders made; object stores have none and ignore this."""
    fs.makedirs(parent(path), exist_ok=True)


def put_folder(local: str | Path, url: str) -> None:
    """Copy the local folder ``local`` to ``url`` (any fsspec URL), replacing what was there:
    for a folder a later step of the same run reads (a training start, a staged model);
    ``staged_folder`` publishes what others read."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(f"{str(local).rstrip('/')}/", path, recursive=True)


MARKER = "manifest.json"
"""What every folder rayllm publishes holds once complete (shards, models, registry versions)."""


def check_replaceable(url: str, overwrite: bool, what: str, key: str) -> None:
    """Refuse to replace a folder rayllm did not write (no manifest) unless ``overwrite``."""
    fs, path = filesystem(url)
    if overwrite or not fs.exists(path):
        return
    if not fs.isdir(path):
        raise RayllmError(f"{what} {url} is a file; choose a folder path with {key}")
    if fs.ls(path, detail=False) and not fs.exists(f"{path}/{MARKER}"):
        raise RayllmError(
            f"{what} {url} exists and was not written by rayllm (no {MARKER}); choose another "
            f"{key} or pass overwrite=true to replace it"
        )


@contextmanager
def staged_folder(url: str) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """Write into a staging folder beside ``url``; on success it replaces ``url``, on failure it
    is removed. Write the folder's completion marker (``manifest.json`` for what others read)
    last: a reader trusts a folder only once it is there.

    Yields the filesystem and the staging path. The one place rayllm publishes folders: shard
    sets, trained models, verified registry copies, fetched corpora.
    """
    fs, target = filesystem(url)
    staging = f"{target.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"
    fs.makedirs(staging, exist_ok=True)
    try:
        yield fs, staging
    except BaseException:
        fs.rm(staging, recursive=True)
        raise
    fs.invalidate_cache()  # object stores' listings are cached; others wrote into staging
    if fs.exists(f"{target}/{MARKER}"):
        fs.rm(f"{target}/{MARKER}")  # unpublish first: readers never see a mixed set
    if fs.exists(target):
        fs.rm(target, recursive=True)
    if isinstance(fs, LocalFileSystem):
        fs.mv(staging, target, recursive=True)  # a rename
        return
    # Object stores have no rename: copy every object, the marker last, then drop the staging.
    # (Folder markers, keys ending in '/' that some writers leave, need no copy.)
    files = [path for path in fs.find(staging) if not path.endswith("/")]
    marker = [path for path in files if path.endswith(f"/{MARKER}")]
    for batch in ([path for path in files if path not in marker], marker):
        if batch:
            fs.copy(batch, [f"{target}{path[len(staging) :]}" for path in batch])
    fs.rm(staging, recursive=True)
