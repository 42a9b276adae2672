"""Rolling a running app onto the versions its registry references name now.

``rayllm registry promote`` (or ``rollback``) moves an alias; ``rollout`` reads the pinned
ServeConfig the running app was built from, resolves each model's reference again and, when a
version changed, redeploys the app with the new pins. Serve replaces the replicas of the moved
models and of the ingress (which holds the pinned config); each model's deployment is versioned
by its own settings (``rayllm.serve.ingress.versioned``), so the others keep theirs. With
``max_surge_percent`` at rayllm's default of 100, each old replica keeps serving until its
replacement is ready, so requests arriving meanwhile are answered, by the old version or
the new. The cluster needs room for the extra replicas while both run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from rayllm.errors import RayllmError
from rayllm.serve.app import deploy, pin, running_config
from rayllm.serve.config import ServeConfig


@dataclass(frozen=True)
class Rollout:
    app_name: str
    config: ServeConfig
    """The app's ServeConfig, pinned to the versions its references name now."""
    changes: dict[str, tuple[str, str]]
    """Each model id whose version changes -> (old version, new version)."""
    follows: dict[str, str]
    """Each model id -> the registry reference it follows."""
    needed: bool
    """Whether the app must be redeployed: a version or a followed reference changed."""
    seconds: float = 0.0
    """From the redeploy until every new replica ran (0 when nothing was redeployed)."""


def plan(app_name: str, running: ServeConfig, follow: dict[str, str] | None = None) -> Rollout:
    """What a rollout of the app built from ``running`` would change: each model's reference
    (``follow`` gives models a new one: model id -> ``name@alias``, ``name:N``...) resolved
    again, against the versions the app serves."""
    follow = follow or {}
    served = {entry.model_id: entry for entry in running.models}
    unknown = sorted(set(follow) - set(served))
    if unknown:
        raise RayllmError(
            f"app {app_name!r} serves no model {', '.join(unknown)}; it serves "
            f"{', '.join(served)} (--model takes MODEL_ID=REFERENCE)"
        )
    unpinned = [
        entry.model_copy(update={"model": follow.get(model_id, entry.model), "version": None})
        for model_id, entry in served.items()
    ]
    wanted = pin(running.model_copy(update={"models": unpinned}))
    changes = {
        entry.model_id: (served[entry.model_id].version, entry.version)
        for entry in wanted.models
        if entry.version != served[entry.model_id].version
    }
    follows = {entry.model_id: entry.model for entry in wanted.models}
    moved = any(served[model_id].model != ref for model_id, ref in follows.items())
    return Rollout(app_name, wanted, changes, follows, needed=bool(changes) or moved)


def rollout(app_name: str = "rayllm", follow: dict[str, str] | None = None) -> Rollout:
    """Move the running app ``app_name`` onto the versions its references name now."""
    planned = plan(app_name, running_config(app_name), follow)
    if not planned.needed:
        return planned
    started = time.time()
    deploy(planned.config)
    return replace(planned, seconds=time.time() - started)
