"""The OpenAI front end: ``ray.serve.llm``'s ingress, with rayllm's API-key check in front
and OpenAI-style errors for the requests it would otherwise answer in FastAPI's own shape
(unknown model or route), with a 500 (a body that is not JSON) or not at all (unknown roles),
the engine's own message (with no traceback logged) for a request the engine refuses, and a
retryable 503 where Serve would answer 500 for a model replica lost mid-request.

The ingress class, its deployment options and ``make_fastapi_ingress`` are public in Ray 2.60
(``ray.serve.llm.ingress``); the FastAPI app that carries Ray's own middleware (request ids,
error bodies, HTTP metrics), the model cards and the direct-ingress app (Ray's "direct
streaming") are built by ``ray.llm._internal`` helpers. This module is the only place that
imports them; ``tests/serve/test_app.py`` and ``tests/serve/test_direct.py`` pin them through
the served apps. ``versioned`` and ``surging`` set options on the deployment an
``Application`` binds (a private attribute; a version only through Serve's ``_internal``
flag): ``tests/serve/test_config.py``, ``test_rollout.py`` and ``test_direct.py`` pin them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    OpenAIHTTPException,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.builder import (
    _build_direct_streaming_llm_deployment,
    _build_openai_ingress_request_router,
)
from ray.llm._internal.serve.core.ingress.ingress import init as ray_llm_fastapi_app
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from vllm.exceptions import VLLMClientError

import rayllm
from rayllm.serve.adapters import AdapterNames, AdapterRefused
from rayllm.serve.app import key_digest
from rayllm.serve.config import ServeConfig

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
"""The message roles of OpenAI's chat API; vLLM would pass any other to the chat template."""


def openai_error(status: int, message: str, code: str | int | None = None, **headers: str):
    """The error body OpenAI's API and its SDKs expect: ``{"error": {"message", ...}}``."""
    error = {
        "message": message,
        "type": "invalid_request_error",
        "param": None,
        "code": status if code is None else code,
    }
    return JSONResponse({"error": error}, status_code=status, headers=headers or None)


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
        message = "missing or unknown API key: send it as 'Authorization: Bearer <key>'"
        response = openai_error(401, message, "invalid_api_key", **{"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        digest = key_digest(key.strip()).encode()
        return any(hmac.compare_digest(digest, known) for known in self.digests)


class JsonBodiesOnly:
    """ASGI middleware: a POST whose body is not declared JSON gets a 415 before FastAPI
    parses it (Ray's validation handler would answer it with a 500)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            declared = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            if declared.split(";")[0].strip().lower() != "application/json":
                message = (
                    f"send the body as JSON with 'Content-Type: application/json', not {declared!r}"
                )
                await openai_error(415, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def unknown_role(messages: Any) -> str | None:
    """Why a chat request's ``messages`` cannot be answered, if one has no role or one OpenAI's
    API does not have (vLLM would pass it to the chat template); other faults are vLLM's to
    tell."""
    for number, message in enumerate(messages if isinstance(messages, list) else ()):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            return (
                f"messages[{number}].role is {role!r}; use one of {', '.join(sorted(CHAT_ROLES))}"
            )
    return None


class KnownChatRolesOnly:
    """ASGI middleware for a replica answering HTTP itself (``ingress: direct``): a chat
    request with a message in an unknown role gets a 400, as rayllm's ingress answers it. The
    body (a chat request's: small) is read whole, checked, and handed on unchanged."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].endswith("/chat/completions")
        ):
            await self.app(scope, receive, send)
            return
        chunks, message = [], {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        try:
            refused = unknown_role(json.loads(body).get("messages"))
        except (ValueError, AttributeError):  # not a JSON object: vLLM answers it
            refused = None
        if refused:
            await openai_error(400, refused)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class RegistryVersionsInModels:
    """ASGI middleware for a replica answering HTTP itself (``ingress: direct``): its
    ``/v1/models`` (vLLM's own listing) and ``/v1/models/{id}`` tell each model's registry
    version in ``metadata.registry_version``, as rayllm's ingress does. The answer (small) is
    read whole, the version added, and sent on."""

    def __init__(self, app: Any, versions: dict[str, str]):
        self.app, self.versions = app, versions

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and ("/v1/models/" in scope["path"] or scope["path"].endswith("/v1/models"))
        ):
            await self.app(scope, receive, send)
            return
        start, chunks = {}, []

        async def with_versions(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start["status"] == 200:
                listing = json.loads(body)
                for card in listing.get("data", [listing]):
                    if card.get("id") in self.versions:
                        card["metadata"] = {"registry_version": self.versions[card["id"]]}
                body = json.dumps(listing).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send(start | {"headers": [*headers, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, with_versions)


def add_request_checks(app: Any, key_digests: list[str]) -> None:
    """The checks every rayllm front end runs before anything else: the API key (when keys are
    configured), then a JSON body."""
    app.add_middleware(JsonBodiesOnly)
    if key_digests:
        app.add_middleware(ApiKeyCheck, digests=key_digests)  # added last: runs first


async def _http_error(request: Request, error: HTTPException) -> Response:
    """Unknown models, routes and methods, in OpenAI's error shape instead of FastAPI's."""
    return openai_error(error.status_code, str(error.detail))


async def _client_error(request: Request, error: VLLMClientError) -> Response:
    """A body vLLM's request model refuses as it is read (no prompt, ``stream_options``
    without ``stream``), with vLLM's message and without Ray's logged traceback."""
    return openai_error(400, str(error))


async def engine_answer(answer: Awaitable[Response]) -> Response:
    """``answer``, with two failures answered here instead of by Ray's middleware.

    A request the engine refused (4xx: ``max_tokens`` past the context, a bad sampling value)
    gets the engine's own message, as vLLM's server sends it; Ray's middleware would wrap it
    in "Message: ..., Internal exception: ..." and log a traceback for each one. A model
    replica that died or became unreachable before its first answer gets a 503: clients retry
    a 503 (Serve would answer 500), and Serve routes the retry to another replica or the one
    replacing it. A stream cut after its first chunk stays cut: its text was already sent."""
    try:
        return await answer
    except OpenAIHTTPException as refused:
        if refused.status_code >= 500:
            raise
        return openai_error(refused.status_code, refused.message)
    except RayActorError as lost:
        reason = str(lost).splitlines()[0][:200]
        message = f"the replica serving this request was lost ({reason}); retry it"
        return openai_error(503, message, "replica_unavailable", **{"Retry-After": "1"})


class Ingress(OpenAiIngress):
    """``ray.serve.llm``'s ingress, pinning each request for a LoRA adapter to one registry
    version (``rayllm.serve.adapters``), refusing chat messages in roles OpenAI's API does not
    have, and holding the pinned ServeConfig it was built from, for ``rayllm serve rollout``
    and ``rayllm serve status`` to read through a DeploymentHandle."""

    def __init__(self, *args: Any, serve_config: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._serve_config = serve_config
        self._adapters = AdapterNames(ServeConfig.model_validate(serve_config))

    async def serve_config(self) -> dict[str, Any]:
        return self._serve_config

    async def models(self) -> ModelList:
        """The served models, then each adapter their replicas can load, with its version."""
        listing = await super().models()
        cards = {card.id: card for card in listing.data}
        for name, version in (await self._adapters.listed()).items():
            base = cards[name.partition(":")[0]]
            metadata = base.metadata | {"registry_version": version}
            listing.data.append(base.model_copy(update={"id": name, "metadata": metadata}))
        return listing

    async def pin_adapter(self, model: str) -> dict[str, Any]:
        """For ``rayllm.client.HandleClient``: ``model`` pinned as a request naming it would
        be (``{"model": ...}``), or why it cannot be served (``{"error": ..., "status": ...}``)."""
        try:
            return {"model": await self._adapters.pinned(model)}
        except AdapterRefused as refused:
            return {"error": str(refused), "status": refused.status}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        refused = await self._pinned(body)
        return refused or await engine_answer(super().completions(body, request))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        role = unknown_role(body.messages)
        if role:
            return openai_error(400, role)
        refused = await self._pinned(body)
        return refused or await engine_answer(super().chat(body, request))

    async def _pinned(self, body: CompletionRequest | ChatCompletionRequest) -> Response | None:
        """Points ``body`` at one adapter version; the error to send if it cannot be served."""
        if body.model:
            try:
                body.model = await self._adapters.pinned(body.model)
            except AdapterRefused as refused:
                return openai_error(refused.status, str(refused))
        return None


def _model_card(config: LLMConfig):
    """``/v1/models`` tells each model's registry version (``metadata.registry_version``)."""
    version = config.model_loading_config.model_source
    return to_model_metadata(config.model_id, config, overrides={"registry_version": version})


def openai_app(
    llm_configs: list[LLMConfig], key_digests: list[str], serve_config: dict[str, Any]
) -> Application:
    """One ingress (OpenAI routes, no CPU of its own) over one vLLM deployment per model;
    ``serve_config`` is the pinned ServeConfig the app is built from, as JSON."""
    app = ray_llm_fastapi_app()
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(VLLMClientError, _client_error)
    add_request_checks(app, key_digests)
    options = Ingress.get_deployment_options(llm_configs)
    options |= {"ray_actor_options": {"num_cpus": 0}, "max_surge_percent": 100}
    return serve.deployment(make_fastapi_ingress(Ingress, app=app), **options).bind(
        llm_deployments={c.model_id: versioned(build_llm_deployment(c), c) for c in llm_configs},
        model_cards={c.model_id: _model_card(c) for c in llm_configs},
        serve_config=serve_config,
    )


def direct_app(
    llm_config: LLMConfig, key_digests: list[str], serve_config: dict[str, Any]
) -> Application:
    """One model with no ingress deployment (``ingress: direct``): each replica
    (``ModelServer``) answers the OpenAI routes with vLLM's own server, and Serve's HAProxy
    sends each request straight to the replica that Ray's LLM request router picks. What
    ``ray.serve.llm.build_openai_app`` builds under ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING``,
    with rayllm's replica, keys and config."""
    kwargs = {"key_digests": key_digests, "serve_config": serve_config}
    server = _build_direct_streaming_llm_deployment(llm_config, bind_kwargs=kwargs)
    router = _build_openai_ingress_request_router(server=server, llm_config=llm_config)
    return server._with_ingress_request_router(surging(router))


def versioned(app: Application, llm_config: LLMConfig) -> Application:
    """``app``, one model's deployment, with a version of its own: a digest of the model's
    ``LLMConfig`` and of rayllm's release. ``serve.run`` gives a deployment without one a random
    version, and Serve replaces the replicas of a deployment whose version changed: every
    redeploy of the app (``rayllm serve rollout``) replaced every model's replicas, moved or
    not. Adapter over the ``Application`` Ray's builder returns (its private bound deployment;
    Ray 2.60 takes a version from Serve's own code only, ``_internal``). A Serve config file
    (``serve deploy``) versions an app's deployments together, whatever this sets."""
    settings = json.dumps(
        [rayllm.__version__, llm_config.model_dump()], sort_keys=True, default=_named
    )
    version = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return Application(app._bound_deployment.options(version=version, _internal=True))


def _named(value: Any) -> str:
    """A class in an ``LLMConfig`` (its server, its callback) by its import path; anything
    else JSON lacks by its ``repr`` (at worst one that changes from build to build, which
    replaces the model's replicas as ``serve.run`` would)."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def surging(app: Application) -> Application:
    """``app`` with its replacement started before its replica stops. A rollout
    (``serve.run`` again) replaces every deployment of the app without a version of its own
    (``versioned``), the router of a direct app too, and at Serve's default the old router
    stopped first: HAProxy then had no router to send a request to until the new one ran
    (503 ``router_unreachable``). Adapter over the ``Application`` Ray's builder returns (its
    private bound deployment)."""
    return Application(app._bound_deployment.options(max_surge_percent=100))
