from __future__ import annotations

import httpx
import openai
import pytest

from tests.server import RunningServer, start_server


@pytest.fixture(scope="session")
def server() -> RunningServer:
    """One real server on the bundled model, shared by the tests that do not need their own settings."""
    running = start_server("--parallel", "8", "--ctx-size", "1024")
    yield running
    running.stop()


@pytest.fixture()
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


@pytest.fixture()
def async_client(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


@pytest.fixture()
def http(server: RunningServer) -> httpx.Client:
    with httpx.Client(
        base_url=server.root_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120
    ) as c:
        yield c


def engine_stats(http_client: httpx.Client) -> dict:
    body = http_client.get("/health").json()
    return body["engines"][0]
