"""The OpenAI front end: ``ray.serve.llm``'s ingress, with rayllm's API-key check in front.

The ingress class, its deployment options and ``make_fastapi_ingress`` are public in Ray 2.60
(``ray.serve.llm.ingress``); the FastAPI app that carries Ray's own middleware (request ids,
error bodies, HTTP metrics) and the model cards are built by ``ray.llm._internal`` helpers.
This module is the only place that imports them; ``tests/serve/test_app.py`` pins them
through the served app.
"""

from __future__ import annotations

import hmac
from typing import Any

from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import init as ray_llm_fastapi_app
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from starlette.responses import JSONResponse

from rayllm.serve.app import key_digest


class ApiKeyCheck:
    """ASGI middleware: a request without a known ``Authorization: Bearer`` key gets an
    OpenAI-style 401 before it is parsed or routed. Keys are compared by digest, in constant
    time, and never logged."""

    def __init__(self, app: Any, digests: list[str]):
        self.app, self.digests = app, [d.encode() for d in digests]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        error = {
            "message": "missing or unknown API key: send it as 'Authorization: Bearer <key>'",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        response = JSONResponse(
            {"error": error}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        digest = key_digest(key.strip()).encode()
        return any(hmac.compare_digest(digest, known) for known in self.digests)


def _model_card(config: LLMConfig):
    """``/v1/models`` tells each model's registry version (``metadata.registry_version``)."""
    version = config.model_loading_config.model_source
    return to_model_metadata(config.model_id, config, overrides={"registry_version": version})


def openai_app(llm_configs: list[LLMConfig], key_digests: list[str]) -> Application:
    """One ingress (OpenAI routes, no CPU of its own) over one vLLM deployment per model."""
    app = ray_llm_fastapi_app()
    if key_digests:
        app.add_middleware(ApiKeyCheck, digests=key_digests)  # added last: runs first
    options = OpenAiIngress.get_deployment_options(llm_configs)
    options["ray_actor_options"] = {"num_cpus": 0}
    return serve.deployment(make_fastapi_ingress(OpenAiIngress, app=app), **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in llm_configs},
        model_cards={c.model_id: _model_card(c) for c in llm_configs},
    )
