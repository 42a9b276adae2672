"""LoRA adapters on their base model's replicas: which registry version a request means.

A request names an adapter after the model it adapts: ``shakespeare:tiny-lora`` (its latest
version), ``shakespeare:tiny-lora:2`` or ``shakespeare:tiny-lora@production``. The ingress pins
that name to one version (``shakespeare:tiny-lora:2``) before routing, so every replica loads
the same weights, a newly published version or a moved alias takes effect at once, and a
request for an adapter the app cannot serve gets a clear 4xx before it reaches an engine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from rayllm.errors import RayllmError
from rayllm.registry.store import Registry, Version
from rayllm.serve.config import ModelEntry, ServeConfig

RESOLVED_FOR_S = 5.0
"""How long the ingress reuses what an adapter name resolved to (the registry may be remote)."""


class AdapterRefused(RayllmError):
    """A request for an adapter the app cannot serve; ``status`` is the HTTP status to send."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def servable_adapter(registry: Registry, ref: str, base: ModelEntry) -> Version:
    """The adapter version ``ref`` names, if ``base``'s replicas can serve it."""
    try:
        version = registry.resolve(ref)
    except RayllmError as error:
        raise AdapterRefused(404, str(error)) from None
    check_adapter(version, base)
    return version


def check_adapter(version: Version, base: ModelEntry) -> None:
    """Refuse what ``base``'s replicas cannot serve: a full model, an adapter of another
    version, a method vLLM does not serve, a rank above the replicas' maximum."""
    adapter = version.lineage.get("adapter")
    if adapter is None:
        raise AdapterRefused(
            400, f"{version.ref} is a full model, not an adapter; serve it as a model of its own"
        )
    if version.lineage.get("parent") != base.version:
        raise AdapterRefused(
            400,
            f"adapter {version.ref} was trained on {version.lineage.get('parent')} and "
            f"{base.model_id} serves {base.version}; name an adapter of {base.version}",
        )
    if adapter.get("peft_type") != "LORA":
        raise AdapterRefused(
            400, f"{version.ref} is a {adapter.get('peft_type')} adapter; vLLM serves LoRA only"
        )
    if (adapter.get("r") or 0) > base.max_lora_rank:
        raise AdapterRefused(
            400,
            f"{version.ref} has rank {adapter['r']} and {base.model_id} accepts ranks up to "
            f"{base.max_lora_rank}; redeploy with max_lora_rank={adapter['r']} or more",
        )


@dataclass
class AdapterNames:
    """The ingress's view of the registry's adapters, for routing and for ``/v1/models``."""

    config: ServeConfig
    """The pinned ServeConfig the app was built from."""

    def __post_init__(self) -> None:
        self.registry = Registry(self.config.registry_root())
        self.bases = {entry.model_id: entry for entry in self.config.entries()}
        self._resolved: dict[str, tuple[float, str | AdapterRefused]] = {}

    async def pinned(self, model: str) -> str:
        """``base_id:adapter[:N|@alias]`` -> ``base_id:adapter:N``; AdapterRefused if the app
        cannot serve it. A name without an adapter part is returned as it is."""
        base_id, _, ref = model.partition(":")
        base = self.bases.get(base_id)
        if not ref or base is None:  # not an adapter name; the ingress routes or refuses it
            return model
        if not base.max_loras:
            raise AdapterRefused(
                400, f"{base_id} serves no adapters; redeploy it with max_loras=1 or more"
            )
        when, answer = self._resolved.get(model, (0.0, ""))
        if time.monotonic() - when > RESOLVED_FOR_S:
            try:
                version = await asyncio.to_thread(servable_adapter, self.registry, ref, base)
                answer = f"{base_id}:{version.ref}"
            except AdapterRefused as refused:
                answer = refused
            self._resolved[model] = (time.monotonic(), answer)
        if isinstance(answer, AdapterRefused):
            raise answer
        return answer

    async def listed(self) -> dict[str, str]:
        """Each servable adapter's request name (``base_id:adapter``) -> its latest version."""
        return await asyncio.to_thread(self._listed)

    def _listed(self) -> dict[str, str]:
        names = {}
        bases = {base_id: base for base_id, base in self.bases.items() if base.max_loras}
        for name in self.registry.models() if bases else []:
            version = self.registry.resolve(name)
            for base_id, base in bases.items():
                try:
                    check_adapter(version, base)
                except AdapterRefused:
                    continue
                names[f"{base_id}:{name}"] = version.ref
        return names
