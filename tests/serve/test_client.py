"""The HTTP clients' retries, against a real HTTP server that answers as a scaling or failing
endpoint would: retryable statuses are tried again (and logged), final ones are not, and a
server that is down is one clear error."""

import asyncio
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayllm.client import AsyncClient, Client, EndpointError, Retry
from tests.conftest import free_port

FAST = Retry(attempts=3, first_delay_s=0.01, max_delay_s=0.02)
ANSWER = {"choices": [{"text": "a completion"}]}


@pytest.fixture
def endpoint():
    """An HTTP server that answers each POST with the next status of ``statuses`` (200 once
    they run out), and counts the requests."""
    state = {"statuses": [], "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            state["requests"] += 1
            status = state["statuses"].pop(0) if state["statuses"] else 200
            body = ANSWER if status == 200 else {"error": {"message": f"status {status}"}}
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()


@pytest.fixture
def retries():
    """The messages the clients log as they retry (a handler on their own logger: a process
    that started Ray has Ray's handlers on the root logger)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("rayllm.client")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


@pytest.mark.parametrize("status", [503, 429, 502])
def test_retryable_answers_are_tried_again_and_logged(endpoint, retries, status):
    url, state = endpoint
    state["statuses"] = [status, status]
    with Client(url, "m", retry=FAST) as client:
        assert client.complete("KING.") == "a completion"
    assert state["requests"] == 3
    tries = retries
    assert len(tries) == 2
    assert tries[0].startswith(f"{url}/v1/completions answered {status}; try 2 of 3 in ")


def test_the_async_client_retries_the_same_way(endpoint):
    url, state = endpoint
    state["statuses"] = [503]

    async def complete() -> str:
        async with AsyncClient(url, "m", retry=FAST) as client:
            return await client.complete("KING.")

    assert asyncio.run(complete()) == "a completion"
    assert state["requests"] == 2


def test_spent_tries_and_final_answers_are_one_error(endpoint):
    url, state = endpoint
    state["statuses"] = [503, 503, 503]
    with Client(url, "m", retry=FAST) as client, pytest.raises(EndpointError) as spent:
        client.complete("KING.")
    assert str(spent.value) == f"{url} answered 503: status 503 after 3 tries"
    assert spent.value.status == 503 and state["requests"] == 3

    state["statuses"], state["requests"] = [400], 0
    with Client(url, "m", retry=FAST) as client, pytest.raises(EndpointError) as final:
        client.complete("KING.")
    assert str(final.value) == f"{url} answered 400: status 400"
    assert state["requests"] == 1  # a bad request is not sent again


def test_a_server_that_is_down_is_one_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, "m", retry=FAST) as client, pytest.raises(EndpointError) as down:
        client.complete("KING.")
    assert str(down.value).startswith(f"cannot reach {url} after 3 tries (")
    assert str(down.value).endswith("); is it serving?")
    assert down.value.status is None
