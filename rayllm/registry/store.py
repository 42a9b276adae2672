"""The model registry: Hugging Face-format model versions on any fsspec URL.

Layout under the root::

    <root>/<model>/versions/<n>/            config.json, model.safetensors, tokenizer files, ...
    <root>/<model>/versions/<n>/manifest.json   written last: size + sha256 of every file, lineage
    <root>/<model>/aliases.json             {"production": 3, ...}

A version is visible only once its manifest exists, so a crashed publish leaves nothing a
reader can resolve. References are ``name`` (latest), ``name:3`` or ``name@alias``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from rayllm.config import StageConfig
from rayllm.data.corpora import cache_dir
from rayllm.errors import RayllmError
from rayllm.paths import absolute_url, is_local

MANIFEST = "manifest.json"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryConfig(StageConfig):
    root: str = "rayllm-work/registry"
    """Any fsspec URL: a local folder, s3://bucket/prefix, gs://..., memory://..."""


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def check_name(name: str, what: str = "model name") -> str:
    if not SAFE_NAME.match(name) or ".." in name:
        raise RayllmError(
            f"{what} {name!r} is not allowed; use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128 characters, no '..')"
        )
    return name


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    def __init__(self, root: str):
        self.url = absolute_url(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    # --- reading -------------------------------------------------------------------------

    def models(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(Path(p).name for p in self.fs.ls(self.root, detail=False) if self.fs.isdir(p))

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name``, oldest first (those with a manifest only)."""
        folder = f"{self.root}/{check_name(name)}/versions"
        if not self.fs.exists(folder):
            return []
        numbers = [
            int(Path(p).name) for p in self.fs.ls(folder, detail=False) if Path(p).name.isdigit()
        ]
        return sorted(n for n in numbers if self.fs.exists(f"{folder}/{n}/{MANIFEST}"))

    def aliases(self, name: str) -> dict[str, int]:
        path = f"{self.root}/{check_name(name)}/aliases.json"
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path) as handle:
            return json.load(handle)["aliases"]

    def resolve(self, ref: str) -> Version:
        """``name``, ``name:3`` or ``name@alias`` -> a published version and its manifest."""
        name, selector = _split_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.models()) or "none yet"
            raise RayllmError(
                f"model {name!r} is not in the registry at {self.url} (models: {known}); "
                "publish it first or check the name"
            )
        if selector.startswith("@"):
            aliases = self.aliases(name)
            if selector[1:] not in aliases:
                raise RayllmError(
                    f"{name} has no alias {selector[1:]!r} (aliases: {', '.join(aliases) or 'none'})"
                )
            number = aliases[selector[1:]]
        elif selector.startswith(":"):
            number = int(selector[1:]) if selector[1:].isdigit() else -1
            if number not in versions:
                raise RayllmError(
                    f"{name} has no version {selector[1:]!r} (versions: {', '.join(map(str, versions))})"
                )
        else:
            number = versions[-1]
        return Version(name, number, self._read_manifest(name, number))

    def _version_dir(self, name: str, number: int) -> str:
        return f"{self.root}/{name}/versions/{number}"

    def _read_manifest(self, name: str, number: int) -> dict[str, Any]:
        path = f"{self._version_dir(name, number)}/{MANIFEST}"
        try:
            with self.fs.open(path) as handle:
                return json.load(handle)
        except json.JSONDecodeError as err:
            raise RayllmError(
                f"the registry manifest {path} does not parse ({err}); the version is damaged"
            ) from None

    def verify(self, version: Version) -> None:
        """Check every file's size and sha256 against the manifest."""
        folder = self._version_dir(version.name, version.version)
        for entry in version.manifest["files"]:
            path = f"{folder}/{entry['path']}"
            if (
                not self.fs.exists(path)
                or self.fs.size(path) != entry["size"]
                or _sha256(self.fs, path) != entry["sha256"]
            ):
                raise RayllmError(
                    f"{version.ref}: file {entry['path']} is missing or does not match its checksum; "
                    "the version is corrupted, re-publish it"
                )

    def local_path(self, ref: str) -> tuple[Version, Path]:
        """A verified local folder holding the version: in place for local roots, else cached."""
        version = self.resolve(ref)
        source = self._version_dir(version.name, version.version)
        if is_local(self.url):
            self.verify(version)
            return version, Path(source)
        key = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        target = cache_dir() / "registry" / key / version.name / str(version.version)
        if not (target / ".verified").exists():
            self.verify(version)
            staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            self.fs.get(source + "/", str(staging), recursive=True)
            (staging / ".verified").touch()
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        return version, target

    # --- writing -------------------------------------------------------------------------

    def publish(self, name: str, folder: str | Path, lineage: dict[str, Any]) -> Version:
        """Copy a Hugging Face-format folder in as the next version; the manifest goes last."""
        check_name(name)
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not (folder / "config.json").exists():
            raise RayllmError(f"{folder} is not a Hugging Face model folder (no config.json)")
        number = self._claim_version(name)
        target = self._version_dir(name, number)
        entries = []
        for path in files:
            relative = path.relative_to(folder).as_posix()
            self.fs.put_file(str(path), f"{target}/{relative}")
            entries.append(
                {
                    "path": relative,
                    "size": path.stat().st_size,
                    "sha256": _sha256(fsspec.filesystem("file"), str(path)),
                }
            )
        manifest = {
            "format": "rayllm.registry/1",
            "name": name,
            "version": number,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_by": getpass.getuser(),
            "files": entries,
            "lineage": lineage,
        }
        with self.fs.open(f"{target}/{MANIFEST}", "w") as handle:
            json.dump(manifest, handle, indent=2)
        return Version(name, number, manifest)

    def _claim_version(self, name: str) -> int:
        """Reserve the next version number; on local disks mkdir makes the claim exclusive."""
        versions_dir = f"{self.root}/{name}/versions"
        self.fs.makedirs(versions_dir, exist_ok=True)
        while True:
            taken = [
                int(Path(p).name)
                for p in self.fs.ls(versions_dir, detail=False)
                if Path(p).name.isdigit()
            ]
            number = max(taken, default=0) + 1
            if is_local(self.url):
                try:
                    os.mkdir(f"{versions_dir}/{number}")
                except FileExistsError:
                    continue
            else:
                self.fs.makedirs(f"{versions_dir}/{number}", exist_ok=True)
            return number

    def set_alias(self, name: str, alias: str, version: int, reason: str = "") -> None:
        check_name(alias, "alias")
        if version not in self.versions(name):
            raise RayllmError(f"{name} has no version {version} (versions: {self.versions(name)})")
        path = f"{self.root}/{name}/aliases.json"
        state = {"aliases": {}, "history": []}
        if self.fs.exists(path):
            with self.fs.open(path) as handle:
                state = json.load(handle)
        state["history"].append(
            {
                "alias": alias,
                "from": state["aliases"].get(alias),
                "to": version,
                "by": getpass.getuser(),
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "reason": reason,
            }
        )
        state["aliases"][alias] = version
        with self.fs.open(path, "w") as handle:
            json.dump(state, handle, indent=2)


def _split_ref(ref: str) -> tuple[str, str]:
    """``name:3`` -> (name, ":3"); ``name@prod`` -> (name, "@prod"); ``name`` -> (name, "")."""
    match = re.match(r"^([^:@]+)([:@].*)?$", ref)
    if not match:
        raise RayllmError(f"model reference {ref!r} is not NAME, NAME:VERSION or NAME@ALIAS")
    return check_name(match.group(1)), match.group(2) or ""
