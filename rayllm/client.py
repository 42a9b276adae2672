"""Python clients for rayllm endpoints: :class:`Client` (blocking) and :class:`AsyncClient`
over HTTP, and :class:`HandleClient` for code running inside the Ray cluster.

The HTTP clients speak the OpenAI routes (the ``openai`` SDK works against the same
endpoints), retry what a serving cluster throws at a caller while it scales or rolls out
(429, 503, dropped connections) with exponential backoff, and turn everything else into one
:class:`EndpointError` that says what happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from rayllm.errors import RayllmError

RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
"""Answers a later try can turn into a success: overload, a replica starting, stopping or
lost mid-request."""

logger = logging.getLogger(__name__)


class EndpointError(RayllmError):
    """A request the endpoint refused or could not answer."""

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        """HTTP status, or None when the endpoint could not be reached."""
        self.body = body
        """The OpenAI-style error body the endpoint sent, when it sent one."""


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with full jitter (the AWS architecture blog's recipe)."""

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.first_delay_s * 2**attempt))


def _versions(models: dict) -> dict[str, str]:
    return {m["id"]: (m.get("metadata") or {}).get("registry_version") for m in models["data"]}


class _Endpoint:
    """What both clients share: the request bodies, the answers' parsing, the errors."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retry: Retry = Retry(),
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.retry = retry
        key = api_key if api_key is not None else os.environ.get("RAYLLM_API_KEY")
        self.options = {
            "base_url": f"{self.base_url}/v1",
            "timeout": timeout,
            "headers": {"Authorization": f"Bearer {key}"} if key else {},
        }

    def _completion(self, prompt: str, max_tokens: int, temperature: float, extra: dict) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens}
        return body | {"temperature": temperature} | extra

    def _chat(self, messages: list[dict[str, str]], max_tokens: int, extra: dict) -> dict:
        return {"model": self.model, "messages": messages, "max_tokens": max_tokens} | extra

    @staticmethod
    def _piece(line: str) -> str | None:
        """The text a server-sent event carries (completion or chat delta), if any."""
        if not line.startswith("data: ") or line == "data: [DONE]":
            return None
        choice = (json.loads(line[len("data: ") :]).get("choices") or [{}])[0]
        return choice.get("text") or (choice.get("delta") or {}).get("content")

    def _retry_delay(
        self,
        attempt: int,
        path: str,
        response: httpx.Response | None = None,
        error: httpx.TransportError | None = None,
    ) -> float:
        """The pause before the next try (logged); raises when the failure is final or the
        tries are spent."""
        last = attempt == self.retry.attempts - 1
        if error is not None:
            if last:
                raise self._unreachable(error) from None
            reason = str(error) or type(error).__name__
        elif last or response.status_code not in RETRYABLE_STATUS:
            raise self._error(response)
        else:
            reason = f"answered {response.status_code}"
        delay = self.retry.delay(attempt)
        tries = f"try {attempt + 2} of {self.retry.attempts}"
        url = self.options["base_url"] + path
        logger.warning("%s %s; %s in %.1f s", url, reason, tries, delay)
        return delay

    def _error(self, response: httpx.Response) -> EndpointError:
        try:
            body = response.json()
            detail = (body.get("error") or {}).get("message") or response.text
        except ValueError:
            body, detail = None, response.text
        status = response.status_code
        hint = ""
        if status == 401:
            hint = "; pass api_key= or set RAYLLM_API_KEY"
        elif status in RETRYABLE_STATUS:
            hint = f" after {self.retry.attempts} tries"
        return EndpointError(
            f"{self.base_url} answered {status}: {detail[:300]}{hint}", status, body
        )

    def _unreachable(self, error: Exception) -> EndpointError:
        return EndpointError(
            f"cannot reach {self.base_url} after {self.retry.attempts} tries ({error}); "
            "is it serving?"
        )


class Client(_Endpoint):
    """Completions and chat against a rayllm endpoint, blocking."""

    def __init__(self, base_url: str, model: str, **options: Any):
        super().__init__(base_url, model, **options)
        self.http = httpx.Client(**self.options)

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/models")["data"]]

    def versions(self) -> dict[str, str]:
        """Each served model id -> the registry version answering for it."""
        return _versions(self._request("GET", "/models"))

    def complete(
        self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, **extra: Any
    ) -> str:
        body = self._completion(prompt, max_tokens, temperature, extra)
        return self._request("POST", "/completions", body)["choices"][0]["text"]

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 64, **extra: Any) -> str:
        answer = self._request("POST", "/chat/completions", self._chat(messages, max_tokens, extra))
        return answer["choices"][0]["message"]["content"]

    def stream(
        self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, **extra: Any
    ) -> Iterator[str]:
        """The completion piece by piece, as the server streams it (server-sent events)."""
        body = self._completion(prompt, max_tokens, temperature, extra) | {"stream": True}
        yield from self._stream("/completions", body)

    def chat_stream(
        self, messages: list[dict[str, str]], max_tokens: int = 64, **extra: Any
    ) -> Iterator[str]:
        yield from self._stream(
            "/chat/completions", self._chat(messages, max_tokens, extra) | {"stream": True}
        )

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        return self._send(method, path, body).json()

    def _stream(self, path: str, body: dict) -> Iterator[str]:
        # Retried until the first byte; a stream cut midway is an error, not a silent restart.
        response = self._send("POST", path, body, stream=True)
        try:
            for line in response.iter_lines():
                if piece := self._piece(line):
                    yield piece
        finally:
            response.close()

    def _send(self, method: str, path: str, body: dict | None, stream: bool = False):
        for attempt in range(self.retry.attempts):
            try:
                request = self.http.build_request(method, path, json=body)
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as error:
                delay = self._retry_delay(attempt, path, error=error)
            else:
                if response.status_code == 200:
                    return response
                response.read()
                delay = self._retry_delay(attempt, path, response=response)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Endpoint):
    """The same calls for asyncio code: many requests in flight from one process."""

    def __init__(self, base_url: str, model: str, **options: Any):
        super().__init__(base_url, model, **options)
        self.http = httpx.AsyncClient(**self.options)

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/models"))["data"]]

    async def versions(self) -> dict[str, str]:
        return _versions(await self._request("GET", "/models"))

    async def complete(
        self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, **extra: Any
    ) -> str:
        body = self._completion(prompt, max_tokens, temperature, extra)
        return (await self._request("POST", "/completions", body))["choices"][0]["text"]

    async def chat(self, messages: list[dict[str, str]], max_tokens: int = 64, **extra: Any) -> str:
        body = self._chat(messages, max_tokens, extra)
        answer = await self._request("POST", "/chat/completions", body)
        return answer["choices"][0]["message"]["content"]

    async def stream(
        self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, **extra: Any
    ) -> AsyncIterator[str]:
        body = self._completion(prompt, max_tokens, temperature, extra) | {"stream": True}
        async for piece in self._stream("/completions", body):
            yield piece

    async def chat_stream(
        self, messages: list[dict[str, str]], max_tokens: int = 64, **extra: Any
    ) -> AsyncIterator[str]:
        body = self._chat(messages, max_tokens, extra) | {"stream": True}
        async for piece in self._stream("/chat/completions", body):
            yield piece

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        return (await self._send(method, path, body)).json()

    async def _stream(self, path: str, body: dict) -> AsyncIterator[str]:
        response = await self._send("POST", path, body, stream=True)
        try:
            async for line in response.aiter_lines():
                if piece := self._piece(line):
                    yield piece
        finally:
            await response.aclose()

    async def _send(self, method: str, path: str, body: dict | None, stream: bool = False):
        for attempt in range(self.retry.attempts):
            try:
                request = self.http.build_request(method, path, json=body)
                response = await self.http.send(request, stream=stream)
            except httpx.TransportError as error:
                delay = self._retry_delay(attempt, path, error=error)
            else:
                if response.status_code == 200:
                    return response
                await response.aread()
                delay = self._retry_delay(attempt, path, response=response)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class HandleClient:
    """Completions and chat from code running inside the Ray cluster (a task, an actor,
    another deployment) through the model's Serve DeploymentHandle: no proxy, no HTTP and no
    API key (the cluster is the trust boundary); Serve routes and queues the calls as it does
    the HTTP ones. Blocking: from async code, call it in a thread. A LoRA adapter is named as
    over HTTP (``shakespeare:shakespeare-lora``) and pinned to one version when the client is
    made."""

    def __init__(self, model: str, app_name: str = "rayllm"):
        from ray import serve

        from rayllm.serve.app import model_deployment

        app = serve.status().applications.get(app_name)
        if app is None:
            raise EndpointError(f"no Serve app named {app_name!r} runs on this cluster")
        base_id, _, adapter = model.partition(":")
        try:
            deployment = model_deployment(app.deployments, base_id)
        except StopIteration:
            raise EndpointError(f"Serve app {app_name!r} serves no model {base_id!r}") from None
        self.model = model
        self.handle = serve.get_deployment_handle(deployment, app_name).options(stream=True)
        if adapter:  # Serve routes it to the replicas holding the adapter, as the ingress does
            pinned = serve.get_app_handle(app_name).pin_adapter.remote(model).result()
            if "error" in pinned:
                raise EndpointError(pinned["error"], pinned["status"])
            self.model = pinned["model"]
            self.handle = self.handle.options(multiplexed_model_id=self.model)

    def complete(
        self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, **extra: Any
    ) -> str:
        from ray.serve.llm.openai_api_models import CompletionRequest

        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens}
        request = CompletionRequest(**body, temperature=temperature, **extra)
        return self._answer(self.handle.completions.remote(request)).choices[0].text

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 64, **extra: Any) -> str:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens}
        request = ChatCompletionRequest(**body, **extra)
        return self._answer(self.handle.chat.remote(request)).choices[0].message.content

    def _answer(self, responses: Any) -> Any:
        """The one response a non-streaming call yields, or its error (an ``ErrorResponse``,
        whose class the server takes from ``ray.llm._internal``) as an EndpointError."""
        response = next(iter(responses))
        error = getattr(response, "error", None)
        if error is not None:
            raise EndpointError(f"{self.model} refused the call: {error.message}", error.code)
        return response
