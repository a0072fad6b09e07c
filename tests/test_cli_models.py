"""`deepserve models list|pull|add` and `deepserve serve` of several models, as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from typer.testing import CliRunner

from deepserve.cli import app
from tests.catalog.fake_hub import FakeHub
from tests.server import start_server

CODER = "deepseek-ai/deepseek-coder-6.7b-instruct"
R1_32B = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_list_json_shows_every_catalog_model_and_where_its_weights_are(tmp_path, tiny_ggufs):
    data = str(tmp_path)
    assert cli("models", "add", "deepseek-r1-32b", "--gguf", tiny_ggufs["deepseek-r1-distill-qwen"],
               "--data-dir", data)[0] == 0
    assert cli("models", "add", "my-model", "--gguf", tiny_ggufs["deepseek-math"], "--template", "deepseek-llm",
               "--data-dir", data)[0] == 0
    code, out = cli("models", "list", "--json", "--data-dir", data)
    assert code == 0
    rows = {row["id"]: row for row in json.loads(out)}
    assert rows[R1_32B]["weights"] == {"status": "present", "path": tiny_ggufs["deepseek-r1-distill-qwen"]}
    assert rows[CODER]["weights"] == {"status": "absent", "path": None}
    assert rows["deepseek-ai/DeepSeek-R1"]["weights"]["status"] == "upstream"
    assert rows["SmolLM2-135M-Instruct"]["weights"]["status"] == "bundled"
    assert rows["SmolLM2-135M-Instruct"]["owned_by"] == "HuggingFaceTB"
    assert rows["deepseek-ai/deepseek-math-7b-instruct"]["prices_nanodollars_per_million_tokens"] == {
        "input": 100_000_000, "cached_input": 100_000_000, "output": 110_000_000}
    assert rows["my-model"] == {"id": "my-model", "in_catalog": False, "template": "deepseek-llm",
                                "weights": {"status": "present", "path": tiny_ggufs["deepseek-math"]}}


def test_list_table_has_one_line_per_model(tmp_path):
    code, out = cli("models", "list", "--data-dir", str(tmp_path))
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["ID", "FAMILY", "ARCH"]
    math = next(line for line in lines if line.startswith("deepseek-ai/deepseek-math-7b-instruct "))
    assert "4096" in math and "$0.10 / $0.11" in math and math.endswith("not pulled")
    assert next(line for line in lines if line.startswith("deepseek-ai/DeepSeek-R1 ")).endswith("upstream engine only")


def test_add_and_pull_refuse_clearly(tmp_path):
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"nope")
    code, out = cli("models", "add", "x", "--gguf", str(not_gguf), "--data-dir", str(tmp_path))
    assert code == 1 and "not a GGUF file" in out
    code, out = cli("models", "pull", "gpt-4", "--data-dir", str(tmp_path))
    assert code == 2 and "not in the catalog" in out and "models add gpt-4 --gguf PATH" in out
    code, out = cli("models", "pull", "deepseek-reasoner", "--data-dir", str(tmp_path))
    assert code == 1 and "upstream engine" in out


def test_serve_refuses_a_model_whose_weights_are_absent(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deepserve", "serve", "--model", "deepseek-coder-6.7b-instruct", "--data-dir",
         str(tmp_path)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"`deepserve models pull {CODER}`" in result.stderr


@pytest.fixture()
def hub():
    running = FakeHub()
    yield running
    running.close()


def test_pull_from_the_hub_then_serve_every_registered_model(tmp_path, tiny_ggufs, hub):
    data = tmp_path / "data"
    env = {**os.environ, "DEEPSERVE_DATA_DIR": str(data), "HF_ENDPOINT": hub.endpoint}
    with open(tiny_ggufs["deepseek-coder"], "rb") as f:
        hub.add("TheBloke/deepseek-coder-6.7B-instruct-GGUF", "deepseek-coder-6.7b-instruct.Q4_K_M.gguf", f.read())
    pulled = subprocess.run([sys.executable, "-m", "deepserve", "models", "pull", "deepseek-coder-6.7b-instruct"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert f"{CODER} ready: {data}/models/TheBloke/deepseek-coder-6.7B-instruct-GGUF/" in pulled.stdout
    assert cli("models", "add", "deepseek-r1-32b", "--gguf", tiny_ggufs["deepseek-r1-distill-qwen"],
               "--data-dir", str(data))[0] == 0

    running = start_server("--parallel", "2", "--ctx-size", "512", threads=1,
                           env={"DEEPSERVE_DATA_DIR": str(data)})
    try:
        assert running.model == f"SmolLM2-135M-Instruct,{CODER},{R1_32B}"
        client = openai.OpenAI(base_url=running.base_url, api_key=running.api_key, max_retries=0)
        cards = {m.id: m.model_dump() for m in client.models.list()}
        assert list(cards) == ["SmolLM2-135M-Instruct", CODER, R1_32B]
        assert (cards[CODER]["owned_by"], cards[CODER]["context_window"]) == ("deepseek-ai", 16384)
        assert cards["SmolLM2-135M-Instruct"]["owned_by"] == "HuggingFaceTB"
        assert cards[R1_32B]["defaults"] == {"max_tokens": 100, "temperature": 0.6, "top_p": 0.95}

        # the catalog's default max_tokens (100) applies when the request gives none; an alias finds the model
        r = client.chat.completions.create(model="deepseek-r1-32b", messages=[{"role": "user", "content": "Hi"}],
                                           extra_body={"ignore_eos": True})
        assert r.model == "deepseek-r1-32b" and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 100
        with pytest.raises(openai.BadRequestError, match="at most 32768"):
            client.chat.completions.create(model=R1_32B, messages=[{"role": "user", "content": "Hi"}], max_tokens=40000)

        c = client.chat.completions.create(model=CODER, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           extra_body={"ignore_eos": True})
        assert c.usage.completion_tokens == 3

        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="deepseek-math-7b-instruct",
                                           messages=[{"role": "user", "content": "x"}])
        assert "`deepserve models pull deepseek-ai/deepseek-math-7b-instruct`" in info.value.message

        health = httpx.get(f"{running.root_url}/health").json()
        assert [e["model"] for e in health["engines"]] == ["SmolLM2-135M-Instruct", CODER, R1_32B]
        assert [(e["threads"], e["ctx_size"]) for e in health["engines"]] == [(1, 512)] * 3

        # deepseek-coder (pulled, its GGUF carries DeepSeek's FIM tokens) fills in the middle; SmolLM2 cannot
        fim = client.completions.create(model=CODER, prompt="def add(a, b):\n", suffix="\nprint(add(1, 2))",
                                        max_tokens=3, extra_body={"ignore_eos": True})
        assert fim.usage.completion_tokens == 3
        with pytest.raises(openai.BadRequestError, match="does not support fill-in-the-middle"):
            client.completions.create(model="SmolLM2-135M-Instruct", prompt="def add(a, b):\n", suffix="x")
    finally:
        running.stop()


def test_pull_of_corrupted_bytes_fails_and_registers_nothing(tmp_path, hub):
    data = tmp_path / "data"
    content = b"GGUF" + os.urandom(2048)
    hub.add("TheBloke/deepseek-coder-6.7B-instruct-GGUF", "deepseek-coder-6.7b-instruct.Q4_K_M.gguf", content,
            served=content[:-1] + b"\x00")
    env = {**os.environ, "DEEPSERVE_DATA_DIR": str(data), "HF_ENDPOINT": hub.endpoint}
    pulled = subprocess.run([sys.executable, "-m", "deepserve", "models", "pull", CODER],
                            capture_output=True, text=True, env=env, timeout=120)
    assert pulled.returncode == 1
    assert "does not match the expected" in pulled.stderr and "the file was removed, pull again" in pulled.stderr
    code, out = cli("models", "list", "--json", "--data-dir", str(data))
    assert {row["id"]: row for row in json.loads(out)}[CODER]["weights"] == {"status": "absent", "path": None}


def test_remove_unregisters_and_deletes_only_downloads(tmp_path, tiny_ggufs):
    data = str(tmp_path)
    assert cli("models", "add", "deepseek-r1-32b", "--gguf", tiny_ggufs["deepseek-r1-distill-qwen"],
               "--data-dir", data)[0] == 0
    code, out = cli("models", "remove", "deepseek-r1-32b", "--delete-files", "--data-dir", data)
    assert code == 0 and out.splitlines() == [
        f"{R1_32B} unregistered",
        f"kept {tiny_ggufs['deepseek-r1-distill-qwen']}: deepserve did not download it (it was registered with "
        "`models add`)"]
    assert os.path.isfile(tiny_ggufs["deepseek-r1-distill-qwen"])
    rows = {row["id"]: row for row in json.loads(cli("models", "list", "--json", "--data-dir", data)[1])}
    assert rows[R1_32B]["weights"]["status"] == "absent"
    code, out = cli("models", "remove", "deepseek-r1-32b", "--data-dir", data)
    assert code == 1 and "'deepseek-r1-32b' is not registered" in out


def test_pull_then_remove_with_delete_files(tmp_path, hub):
    data = tmp_path / "data"
    hub.add("TheBloke/deepseek-coder-6.7B-instruct-GGUF", "deepseek-coder-6.7b-instruct.Q4_K_M.gguf",
            b"GGUF" + os.urandom(1024))
    env = {**os.environ, "DEEPSERVE_DATA_DIR": str(data), "HF_ENDPOINT": hub.endpoint}
    pulled = subprocess.run([sys.executable, "-m", "deepserve", "models", "pull", CODER],
                            capture_output=True, text=True, env=env, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    path = data / "models/TheBloke/deepseek-coder-6.7B-instruct-GGUF/deepseek-coder-6.7b-instruct.Q4_K_M.gguf"
    code, out = cli("models", "remove", "deepseek-coder-6.7b-instruct", "--delete-files", "--data-dir", str(data))
    assert code == 0 and out.splitlines()[:2] == [f"{CODER} unregistered", f"deleted {path}"]
    assert not path.exists() and list((data / "models").iterdir()) == []
