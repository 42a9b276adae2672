"""The model registry: Hugging Face-format model versions on any fsspec URL.

Layout under the root::

    <root>/<model>/versions/<n>/                 config.json, *.safetensors, tokenizer files, ...
    <root>/<model>/versions/<n>/manifest.json    written last: size + sha256 of every file, lineage
    <root>/<model>/claims/<n>/<publisher-id>     who is writing version n (removed once published)
    <root>/<model>/aliases/<n>.json              alias state n: {"aliases": {"production": 3},
                                                 "history": [...]}; the highest n is current
    <root>/<model>/claims-aliases/<n>/<writer>   who is writing alias state n

A version is visible only once its manifest exists, so a crashed publish leaves nothing a reader
can resolve; ``gc`` removes what it left. Version numbers are claimed with a protocol that needs
only read-after-write consistency (local disks, S3, GCS, ...): write a claim, list the claims
of that number, and go on only if no other publisher's claim is there. Two publishers cannot
both go on, since whichever lists second sees the other's claim. References are ``name``
(latest), ``name:3`` or ``name@alias``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from rayllm.config import WORKDIR, StageConfig
from rayllm.errors import RayllmError
from rayllm.paths import (
    absolute_url,
    cache_dir,
    ensure_parent,
    file_lock,
    filesystem,
    is_local,
    staged_folder,
)

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
"""What marks a folder as a peft adapter, published against its base version."""
STALE_CLAIM_S = 600.0
"""A claim this old was left by a writer that crashed; others go on without waiting for it."""
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Model and alias names: letters, digits, '.', '_', '-'; no path can escape the root."""


class RegistryConfig(StageConfig):
    root: str | None = None
    """Any fsspec URL: a local folder, s3://bucket/prefix, gs://..., memory://...; default:
    $RAYLLM_REGISTRY, else rayllm-work/registry."""

    def root_url(self, workdir: str = WORKDIR) -> str:
        return absolute_url(self.root or default_registry(workdir))


def default_registry(workdir: str = WORKDIR) -> str:
    """$RAYLLM_REGISTRY, else the ``registry`` folder of the work directory."""
    return os.environ.get("RAYLLM_REGISTRY") or f"{workdir.rstrip('/')}/registry"


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def lineage(self) -> dict[str, Any]:
        return self.manifest.get("lineage", {})


def check_name(name: str, what: str = "model name") -> str:
    if not SAFE_NAME.match(name) or ".." in name:
        raise RayllmError(
            f"{what} {name!r} is not allowed; use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128 characters, no '..')"
        )
    return name


def split_ref(ref: str) -> tuple[str, str]:
    """``name:3`` -> (name, ":3"); ``name@prod`` -> (name, "@prod"); ``name`` -> (name, "")."""
    match = re.match(r"^([^:@]+)([:@].*)?$", ref)
    if not match:
        raise RayllmError(f"model reference {ref!r} is not NAME, NAME:VERSION or NAME@ALIAS")
    return check_name(match.group(1)), match.group(2) or ""


def sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


class Registry:
    def __init__(self, root: str):
        self.url = absolute_url(root)
        self.fs, self.root = filesystem(self.url)

    def _model_dir(self, name: str) -> str:
        return f"{self.root}/{check_name(name)}"

    def _version_dir(self, name: str, number: int) -> str:
        return f"{self._model_dir(name)}/versions/{number}"

    def _numbers(self, folder: str) -> list[int]:
        return sorted(int(Path(p).name) for p in self._list(folder) if Path(p).name.isdigit())

    def _list(self, folder: str) -> list[str]:
        """The entries of ``folder``; none when it does not exist (on object stores a folder
        vanishes with its last object, possibly between two calls). Listed afresh: a cached
        listing would hide what other processes published since."""
        self.fs.invalidate_cache(folder)
        try:
            return self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []

    # --- reading -------------------------------------------------------------------------

    def models(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(Path(p).name for p in self._list(self.root) if self.fs.isdir(p))

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name``, oldest first (those with a manifest only)."""
        return [
            n
            for n in self._numbers(f"{self._model_dir(name)}/versions")
            if self.fs.exists(f"{self._version_dir(name, n)}/{MANIFEST}")
        ]

    def alias_state(self, name: str) -> dict[str, Any]:
        """``{"aliases": {alias: version}, "history": [every move: from, to, by, at, reason]}``."""
        return self._latest_alias_state(name)[1]

    def aliases(self, name: str) -> dict[str, int]:
        return self.alias_state(name)["aliases"]

    def resolve(self, ref: str) -> Version:
        """``name``, ``name:3`` or ``name@alias`` -> a published version and its manifest."""
        name, selector = split_ref(ref)
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
                known = ", ".join(f"{a}->{v}" for a, v in aliases.items()) or "none"
                raise RayllmError(f"{name} has no alias {selector[1:]!r} (aliases: {known})")
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

    def _read_manifest(self, name: str, number: int) -> dict[str, Any]:
        path = f"{self._version_dir(name, number)}/{MANIFEST}"
        # Not open(): s3fs checks a read against the ETag it listed, and a manifest is
        # rewritten in place (recorded evaluations) by other processes.
        text = self.fs.cat_file(path)
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as err:
            manifest = {"error": str(err)}
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
            raise RayllmError(
                f"the registry manifest {path} is damaged (it does not parse or lists no files); "
                "restore it or delete the version"
            )
        return manifest

    def verify(self, version: Version) -> None:
        """Check every file's size and sha256 against the manifest."""
        check_files(self.fs, self._version_dir(version.name, version.version), version)

    def record_evaluations(self, version: Version, results: dict[str, dict[str, Any]]) -> Version:
        """Add evaluation results (task -> scores) to the version's manifest, each stamped with
        when and by whom; a task scored again replaces its row. Written whole, in one put (a
        rename on local disks), so a reader sees the old manifest or the new one."""
        manifest = self._read_manifest(version.name, version.version)
        stamp = {"at": _now(), "by": _who()}
        table = manifest.setdefault("evaluations", {})
        table |= {task: scores | stamp for task, scores in results.items()}
        path = f"{self._version_dir(version.name, version.version)}/{MANIFEST}"
        payload = json.dumps(manifest, indent=2).encode()
        if is_local(self.url):
            staging = f"{path}.{uuid.uuid4().hex}"
            Path(staging).write_bytes(payload)
            os.replace(staging, path)
        else:
            self.fs.pipe_file(path, payload)
        return Version(version.name, version.version, manifest)

    def version_url(self, version: Version) -> str:
        """The fsspec URL of the version's folder: what processes on any node read it from."""
        return f"{self.url.rstrip('/')}/{check_name(version.name)}/versions/{version.version}"

    def hf_config(self, version: Version) -> dict[str, Any]:
        """The version's Hugging Face ``config.json``, read where the registry keeps it."""
        folder = self._version_dir(version.name, version.version)
        return json.loads(self.fs.cat_file(f"{folder}/config.json"))

    def tensor_shapes(self, version: Version) -> dict[str, list[int]]:
        """Every tensor's shape in the version's safetensors files, read from their headers
        only (an 8-byte length, then JSON), so a remote model is not downloaded for it."""
        folder = self._version_dir(version.name, version.version)
        shapes = {}
        for entry in version.manifest["files"]:
            if entry["path"].endswith(".safetensors"):
                with self.fs.open(f"{folder}/{entry['path']}", "rb") as handle:
                    length = int.from_bytes(handle.read(8), "little")
                    header = json.loads(handle.read(length))
                header.pop("__metadata__", None)
                shapes |= {name: tensor["shape"] for name, tensor in header.items()}
        return shapes

    def lineage(self, ref: str) -> list[Version]:
        """The version and its ancestors, following ``lineage.parent`` across models."""
        chain = [self.resolve(ref)]
        while (parent := chain[-1].lineage.get("parent")) and len(chain) < 100:
            chain.append(self.resolve(parent))
        return chain

    def local_path(self, ref: str) -> tuple[Version, Path]:
        """A verified local folder of the version: in place on local roots, else a cached copy.

        Processes on one node that ask for the same version at once share one download (a
        file lock), and a copy is used only after its checksums were checked, and only while
        the registry's manifest still lists those checksums.
        """
        version = self.resolve(ref)
        source = self._version_dir(version.name, version.version)
        if is_local(self.url):
            self.verify(version)
            return version, Path(source)
        key = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        target = cache_dir() / "registry" / key / version.name / str(version.version)
        # The marker holds the checksums it was verified against: a registry recreated at the
        # same URL (a new bucket, a wiped folder) may hold other files under the same version.
        files = hashlib.sha256(json.dumps(version.manifest["files"], sort_keys=True).encode())
        with file_lock(target.with_name(f"{target.name}.lock")):
            marker = target / ".verified"
            if not marker.exists() or marker.read_text() != files.hexdigest():
                with staged_folder(str(target)) as (local, staging):
                    self.fs.get(source + "/", staging, recursive=True)
                    check_files(local, staging, version)
                    local.pipe_file(f"{staging}/.verified", files.hexdigest().encode())
        return version, target

    def export(self, ref: str, destination: str | Path) -> Version:
        """Copy a verified version to a local folder (a plain Hugging Face model folder)."""
        version, folder = self.local_path(ref)
        destination = Path(destination)
        if destination.exists() and any(destination.iterdir()):
            raise RayllmError(f"{destination} exists and is not empty; choose a new folder")
        shutil.copytree(
            folder, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".verified")
        )
        return version

    # --- writing -------------------------------------------------------------------------

    def publish(self, name: str, folder: str | Path, lineage: dict[str, Any]) -> Version:
        """Copy a Hugging Face-format folder (a model, or a peft adapter of one) in as the next
        version; the manifest goes last."""
        check_name(name)
        folder = Path(folder)
        if not any((folder / f).is_file() for f in ("config.json", ADAPTER_CONFIG)):
            raise RayllmError(
                f"{folder} is not a Hugging Face model folder (no config.json) nor a peft "
                f"adapter ({ADAPTER_CONFIG})"
            )
        if parent := lineage.get("parent"):
            self.resolve(parent)  # a lineage must point at something that exists
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        number, claim = self._claim_version(name)
        target = self._version_dir(name, number)
        local = fsspec.filesystem("file")
        entries = []
        for path in files:
            relative = path.relative_to(folder).as_posix()
            ensure_parent(self.fs, f"{target}/{relative}")
            self.fs.put_file(str(path), f"{target}/{relative}")
            entries.append(
                {
                    "path": relative,
                    "size": path.stat().st_size,
                    "sha256": sha256_of(local, str(path)),
                }
            )
        manifest = {
            "format": "rayllm.registry/1",
            "name": name,
            "version": number,
            "created": _now(),
            "created_by": _who(),
            "files": entries,
            "lineage": lineage,
        }
        self.fs.pipe_file(f"{target}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        # Only our own claim: another publisher may be writing its claim beside it right now,
        # and removing the folder under it would break that publisher (gc clears empty folders).
        self.fs.rm(claim)
        return Version(name, number, manifest)

    def _claim_version(self, name: str) -> tuple[int, str]:
        """Reserve the next version number for this publisher (see the module docstring)."""
        claims = f"{self._model_dir(name)}/claims"
        while True:
            self.fs.invalidate_cache()  # object stores' listings are cached per process
            used = self._numbers(f"{self._model_dir(name)}/versions") + self._numbers(claims)
            number = max(used, default=0) + 1
            claim = self._try_claim(claims, number)
            if claim is None:
                continue
            if not self.fs.exists(f"{self._version_dir(name, number)}/{MANIFEST}"):
                return number, claim
            self.fs.rm(claim)

    def _try_claim(self, claims: str, number: int) -> str | None:
        """Write a claim on ``number``; keep it only if no other live claim is beside it.

        Two writers cannot both keep theirs: whichever lists second sees the other's. A claim
        older than ``STALE_CLAIM_S`` belongs to a crashed writer and is ignored. The loser
        removes its claim and waits a random moment before the caller tries again.
        """
        mine = f"{claims}/{number}/{uuid.uuid4().hex}"
        ensure_parent(self.fs, mine)
        self.fs.pipe_file(mine, json.dumps({"by": _who(), "at": _now()}).encode())
        self.fs.invalidate_cache()  # what others wrote since must be seen from here on
        cutoff = time.time() - STALE_CLAIM_S
        others = [
            p
            for p in self._list(f"{claims}/{number}")
            if p.rstrip("/") != mine and self._modified(p) >= cutoff
        ]
        if not others:
            return mine
        self.fs.rm(mine)
        time.sleep(random.uniform(0.01, 0.2))
        return None

    def set_alias(
        self, name: str, alias: str, version: int, reason: str = "", forced: bool = False
    ) -> int | None:
        """Point ``alias`` at ``version``; returns the version it pointed at before. The alias's
        gate (``set_gate``) must pass unless ``forced``, which needs a reason."""
        check_name(alias, "alias")
        if version not in self.versions(name):
            raise RayllmError(f"{name} has no version {version} (versions: {self.versions(name)})")
        gate = self.alias_state(name).get("gates", {}).get(alias, {})
        failures = gate_failures(self.resolve(f"{name}:{version}"), gate)
        if failures and not forced:
            raise RayllmError(
                f"{name}:{version} does not pass {name}@{alias}'s gate: {'; '.join(failures)}. "
                "Score it with rayllm eval, or promote with --force and a --reason"
            )
        if forced and not reason:
            raise RayllmError("a forced promotion needs a --reason, for the alias history")

        def move(state: dict[str, Any]) -> int | None:
            previous = state["aliases"].get(alias)
            move = {"alias": alias, "from": previous, "to": version, "by": _who(), "at": _now()}
            state["history"].append(
                move | {"reason": reason} | ({"forced": failures} if forced and failures else {})
            )
            state["aliases"][alias] = version
            return previous

        return self._change_alias_state(name, move)

    def set_gate(self, name: str, alias: str, thresholds: dict[str, dict[str, float]]) -> None:
        """What a version must score to be promoted to ``alias``: ``{"qa.f1": {"min": 0.3},
        "perplexity.perplexity": {"max": 40}}`` (task and score as ``rayllm eval`` records
        them); empty removes the gate."""
        check_name(alias, "alias")
        self.resolve(name)  # the model must exist
        for metric, bounds in thresholds.items():
            if metric.count(".") != 1 or not bounds or set(bounds) - {"min", "max"}:
                raise RayllmError(
                    f"gate threshold {metric}={bounds}: name a task's score as TASK.SCORE "
                    "(e.g. qa.f1) with a min or a max"
                )

        def change(state: dict[str, Any]) -> None:
            gates = state.setdefault("gates", {})
            if thresholds:
                gates[alias] = thresholds
            else:
                gates.pop(alias, None)
            move = {"alias": alias, "gate": thresholds, "by": _who(), "at": _now()}
            state["history"].append(move)

        self._change_alias_state(name, change)

    def _change_alias_state(self, name: str, change) -> Any:
        """Write the next numbered alias state (``aliases/<n>.json``): ``change`` applied to
        state ``n - 1``, claimed like a version number, so concurrent writers never lose an
        update: whoever loses the claim reads the winner's state and tries again."""
        folder = f"{self._model_dir(name)}/aliases"
        while True:
            self.fs.invalidate_cache()
            number, state = self._latest_alias_state(name)
            claim = self._try_claim(f"{self._model_dir(name)}/claims-aliases", number + 1)
            if claim is None:
                continue
            try:
                if self.fs.exists(f"{folder}/{number + 1}.json"):
                    continue  # another writer finished state n + 1 meanwhile: start again
                outcome = change(state)
                ensure_parent(self.fs, f"{folder}/{number + 1}.json")
                self.fs.pipe_file(
                    f"{folder}/{number + 1}.json", json.dumps(state, indent=2).encode()
                )
                return outcome
            finally:
                self.fs.rm(claim)

    def _latest_alias_state(self, name: str) -> tuple[int, dict[str, Any]]:
        """The newest alias state and its number (0: none yet)."""
        folder = f"{self._model_dir(name)}/aliases"
        numbers = [
            int(Path(p).stem)
            for p in self._list(folder)
            if Path(p).stem.isdigit() and p.endswith(".json")
        ]
        if not numbers:
            return 0, {"aliases": {}, "history": []}
        number = max(numbers)
        with self.fs.open(f"{folder}/{number}.json") as handle:
            return number, json.load(handle)

    def rollback(self, name: str, alias: str, reason: str = "") -> int:
        """Point ``alias`` back at the version it pointed at before its last move."""
        state = self.alias_state(name)
        moves = [h for h in state["history"] if h["alias"] == alias and "to" in h]
        if not moves or moves[-1]["from"] is None:
            raise RayllmError(f"{name}@{alias} has no earlier target to roll back to")
        target = moves[-1]["from"]
        # A rollback restores what served before: the gate does not hold it up.
        reason = reason or f"rollback from {moves[-1]['to']}"
        self.set_alias(name, alias, target, reason, forced=True)
        return target

    def gc(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove unpublished leftovers (crashed publishes) older than ``older_than_s``."""
        removed = []
        cutoff = time.time() - older_than_s
        for name in self.models():
            for number in self._numbers(f"{self._model_dir(name)}/versions"):
                folder = self._version_dir(name, number)
                if self.fs.exists(f"{folder}/{MANIFEST}"):
                    continue
                if self._newest_change(folder) < cutoff and not self._live_claim(
                    name, number, cutoff
                ):
                    self.fs.rm(folder, recursive=True)
                    removed.append(f"{name}:{number}")
            for kind in ("claims", "claims-aliases"):
                claims = f"{self._model_dir(name)}/{kind}"
                for number in self._numbers(claims):
                    if self._newest_change(f"{claims}/{number}") < cutoff:
                        self.fs.rm(f"{claims}/{number}", recursive=True)
        return removed

    def _modified(self, path: str) -> float:
        """When ``path`` last changed; 0 if it is gone (a claim removed meanwhile)."""
        try:
            return self.fs.modified(path).timestamp()
        except FileNotFoundError:
            return 0.0

    def _live_claim(self, name: str, number: int, cutoff: float) -> bool:
        claims = f"{self._model_dir(name)}/claims/{number}"
        return self.fs.exists(claims) and self._newest_change(claims) >= cutoff

    def _newest_change(self, folder: str) -> float:
        times = [0.0]
        for path in self.fs.find(folder, withdirs=False):
            modified = self.fs.modified(path)
            times.append(modified.timestamp())
        return max(times)


def gate_failures(version: Version, gate: dict[str, dict[str, float]]) -> list[str]:
    """Each threshold of ``gate`` the version's recorded evaluations miss or do not meet."""
    table = version.manifest.get("evaluations", {})
    failures = []
    for metric, bounds in sorted(gate.items()):
        task, score = metric.split(".")
        value = table.get(task, {}).get(score)
        if value is None:
            failures.append(f"{metric} was never measured")
        elif "min" in bounds and value < bounds["min"]:
            failures.append(f"{metric} {value:.4g} is below {bounds['min']:.4g}")
        elif "max" in bounds and value > bounds["max"]:
            failures.append(f"{metric} {value:.4g} is above {bounds['max']:.4g}")
    return failures


def check_files(fs: fsspec.AbstractFileSystem, folder: str, version: Version) -> None:
    """Every file of ``version``'s manifest is in ``folder`` with its size and sha256."""
    for entry in version.manifest["files"]:
        path = f"{folder}/{entry['path']}"
        if not fs.exists(path):
            raise RayllmError(
                f"{version.ref}: file {entry['path']} is missing; re-publish the version"
            )
        if fs.size(path) != entry["size"] or sha256_of(fs, path) != entry["sha256"]:
            raise RayllmError(
                f"{version.ref}: file {entry['path']} does not match its checksum; "
                "the version is corrupted, re-publish it"
            )
