from __future__ import annotations

import httpx
import openai
import pytest

from tests.server import RunningServer, start_server
from tests.tiny_gguf import SPECS, build_tiny_gguf, old_r1_template


@pytest.fixture(scope="session", autouse=True)
def isolated_data_dir(tmp_path_factory: pytest.TempPathFactory):
    """No test sees the developer's registered models: every server and CLI run gets an empty data dir."""
    path = tmp_path_factory.mktemp("deepserve-data")
    mp = pytest.MonkeyPatch()
    mp.setenv("DEEPSERVE_DATA_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random-weight GGUF files, one per DeepSeek architecture (tests/tiny_gguf.py): family -> path; and
    "deepseek-r1-distill-qwen-old-template", whose template leaves `<think>` to the model (pre-revision R1)."""
    folder = tmp_path_factory.mktemp("tiny-gguf")
    paths = {family: str(build_tiny_gguf(folder / f"{family}.gguf", family)) for family in SPECS}
    old = "deepseek-r1-distill-qwen-old-template"
    paths[old] = str(build_tiny_gguf(folder / f"{old}.gguf", "deepseek-r1-distill-qwen", chat_template=old_r1_template()))
    return paths


@pytest.fixture(scope="session")
def server() -> RunningServer:
    """One real server on the bundled model, shared by the tests that do not need their own settings.
    No --threads: llama.cpp's thread count is the one `make run` gets (a default once crashed decode)."""
    running = start_server("--parallel", "8", "--ctx-size", "1024", threads=None)
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
