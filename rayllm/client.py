"""A small Python client for rayllm endpoints (the openai SDK works against them too)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from rayllm.errors import RayllmError


class Client:
    """Completions and chat against an OpenAI-compatible rayllm endpoint."""

    def __init__(self, base_url: str, model: str, timeout: float = 120.0, api_key: str = "rayllm"):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.http = httpx.Client(
            base_url=f"{self.base_url}/v1",
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def models(self) -> list[str]:
        return [m["id"] for m in self._post_or_get("GET", "/models")["data"]]

    def complete(
        self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, **extra: Any
    ) -> str:
        body = self._completion(prompt, max_tokens, temperature) | extra
        return self._post_or_get("POST", "/completions", body)["choices"][0]["text"]

    def stream(
        self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, **extra: Any
    ) -> Iterator[str]:
        """Yield the completion piece by piece as the server streams it (server-sent events)."""
        body = self._completion(prompt, max_tokens, temperature) | {"stream": True} | extra
        with self.http.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                self._raise(response)
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
                if text := choices[0].get("text"):
                    yield text

    def _completion(self, prompt: str, max_tokens: int, temperature: float) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 64, **extra: Any) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens} | extra
        return self._post_or_get("POST", "/chat/completions", body)["choices"][0]["message"][
            "content"
        ]

    def _post_or_get(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.HTTPError as err:
            raise RayllmError(
                f"cannot reach the endpoint {self.base_url}: {err}; is it serving?"
            ) from None
        if response.status_code != 200:
            self._raise(response)
        return response.json()

    def _raise(self, response: httpx.Response) -> None:
        raise RayllmError(f"the endpoint answered {response.status_code}: {response.text[:300]}")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
