"""Typed configs: one pydantic model per stage, loaded from YAML and overridden from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rayllm.errors import RayllmError
from rayllm.paths import absolute_url

C = TypeVar("C", bound="StageConfig")

WORKDIR = "rayllm-work"
"""Where stages put what they write when the config names no place."""


class StageConfig(BaseModel):
    """Base of every rayllm config: unknown keys are errors, every knob has a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    work_paths: ClassVar[dict[str, str]] = {}
    """Path fields left unset (None) default to these folders under the work directory."""

    def with_work_paths(self, workdir: str = WORKDIR) -> Self:
        """This config with every unset path filled in under ``workdir``; set ones are kept."""
        unset = {
            key: absolute_url(f"{workdir.rstrip('/')}/{folder}")
            for key, folder in self.work_paths.items()
            if getattr(self, key) is None
        }
        return self.model_copy(update=unset)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RayllmError(f"override {text!r} is not KEY=VALUE; write e.g. --set train.steps=200")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RayllmError(f"override {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> C:
    """Build ``cls`` from an optional YAML file, then ``key=value`` overrides on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RayllmError(f"config file {path} does not exist; pass the path of a YAML file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RayllmError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise RayllmError(f"config file {path} must hold a mapping of settings")
        data = loaded
    for text in overrides:
        key_path, value = parse_override(text)
        _apply_override(data, key_path, value)
    try:
        return build_config(cls, data)
    except ValidationError as err:
        raise RayllmError(describe_validation_error(err, str(path) if path else None)) from None


def build_config(cls: type[C], settings: dict[str, Any]) -> C:
    """``cls`` with ``settings`` laid over its defaults, section by section.

    A partial section keeps the defaults of the rest of that section, including defaults that
    a parent config sets for a child (the quickstart's data settings, say).
    """
    return cls.model_validate(_deep_merge(cls().model_dump(), settings))


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe_validation_error(err: ValidationError, source: str | None) -> str:
    """One readable line per problem, naming the key and where it was set (``source``: a
    config file, say; none for the command line's ``--set`` alone)."""
    where = f" in {source}" if source else ""
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}{where}; check the spelling")
        elif not key:  # a check across keys: its message names them
            lines.append(f"{source}: {message}" if source else message)
        else:
            lines.append(f"config key {key!r}{where}: {message}")
    return "; ".join(lines)


def dump_config(config: BaseModel) -> str:
    """The config as YAML, the same shape ``load_config`` reads."""
    return dump_yaml(config.model_dump(mode="json"))


class _ReadableDumper(yaml.SafeDumper):
    """Safe YAML for people to read: no anchors for repeated objects, text of several lines
    as a block."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    )


_ReadableDumper.add_representer(str, _text)


def dump_yaml(document: Any) -> str:
    """``document`` as YAML, keys in their order (configs, Serve config files, manifests)."""
    return yaml.dump(document, Dumper=_ReadableDumper, sort_keys=False, width=100)
