"""deepserve in front of two upstream deepserve processes (the bundled model), all real, on 127.0.0.1.

The front serves three upstream-only models from a models file: `smol-remote` (upstreams a and b),
`smol-failover` (a dead port, then b) and `smol-down` (only the dead port). Clients are the openai SDK and
httpx. What is checked: answers and usage equal the upstream's, every dialect, least-outstanding routing and
prefix affinity as the upstreams themselves count requests, a client that hangs up cancelling the upstream
request, failover before the first token, a clean error event and a charge of what was delivered when an
upstream dies mid-stream, billing from the upstream's counts, and no upstream key in any log or answer.
The test that kills upstream a runs last.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from typing import Any

import httpx
import openai
import pytest

from tests.billing.servers import ADMIN_KEY, OPERATOR_KEY, PRICE, start_billing_server
from tests.server import RunningServer, start_server

UPSTREAM_KEY = "sk-upstream-secret-9d2e4b7a"
UPSTREAM_MODEL = "SmolLM2-135M-Instruct"
PREFIX = "You are the assistant of a bakery. Answer in one short sentence. " * 6  # > affinity_chars


def dead_port() -> int:
    """A port nothing listens on: what a killed upstream looks like to a new connection."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def upstreams():
    started: list[RunningServer] = []
    try:
        for _ in range(2):
            started.append(start_server("--parallel", "4", "--ctx-size", "1024", api_key=UPSTREAM_KEY))
        yield started
    finally:
        for running in started:
            running.stop()


@pytest.fixture(scope="module")
def front(upstreams, tmp_path_factory):
    a, b = upstreams
    dead = f"http://127.0.0.1:{dead_port()}/v1"
    common = {"upstream_model": UPSTREAM_MODEL, "context_window": 1024}
    config = {"models": [
        {"id": "smol-remote", **common, "affinity_chars": 200, "health_interval_s": 0.5,
         "upstreams": [{"url": a.base_url, "api_key_env": "TEST_UPSTREAM_KEY", "name": "a"},
                       {"url": b.base_url, "api_key": UPSTREAM_KEY, "name": "b"}]},
        {"id": "smol-failover", **common, "health_interval_s": 0, "eject_after": 1, "eject_s": 3600,
         "upstreams": [{"url": dead, "name": "dead"}, {"url": b.base_url, "api_key": UPSTREAM_KEY, "name": "b"}]},
        {"id": "smol-down", **common, "health_interval_s": 0, "eject_after": 1, "eject_s": 3600,
         "upstreams": [{"url": dead, "name": "dead"}]},
    ]}
    folder = tmp_path_factory.mktemp("gateway")
    path = folder / "models.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    running = start_billing_server(f"sqlite:///{folder / 'billing.db'}", "--config", str(path))
    yield running
    running.stop()
    log = running.log()
    assert "smol-remote" in log  # the log did capture the run
    assert UPSTREAM_KEY not in log and UPSTREAM_KEY[3:20] not in log


@pytest.fixture(autouse=True, scope="module")
def upstream_key_env():
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)  # read by the front at start (api_key_env)
    yield
    mp.undo()


@pytest.fixture()
def sdk(front) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.base_url, api_key=OPERATOR_KEY, max_retries=0)


def http(server: RunningServer, key: str = OPERATOR_KEY) -> httpx.Client:
    return httpx.Client(base_url=server.root_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def upstream_stats(server: RunningServer) -> dict[str, Any]:
    with http(server, UPSTREAM_KEY) as client:
        return client.get("/health").json()["engines"][0]


def front_stats(front: RunningServer, model: str) -> dict[str, Any]:
    with http(front) as client:
        engines = client.get("/health").json()["engines"]
    return next(e for e in engines if e["model"] == model)


def wait_idle(servers: list[RunningServer], timeout_s: float = 120) -> None:
    """Until no upstream has a request running or waiting: aborts are applied at an engine step (bounded poll)."""
    deadline = time.monotonic() + timeout_s
    while any(st["num_running"] or st["num_waiting"] for st in map(upstream_stats, servers)):
        assert time.monotonic() < deadline, "an upstream request was never aborted"
        time.sleep(0.05)  # poll interval (2 cores: leave them to the upstreams)


def direct(upstream: RunningServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with http(upstream, UPSTREAM_KEY) as client:
        r = client.post(path, json={**body, "model": UPSTREAM_MODEL})
        assert r.status_code == 200, r.text
        return r.json()


CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}


def test_chat_answers_and_usage_are_the_upstreams(sdk, upstreams):
    expected = direct(upstreams[1], "/v1/chat/completions", CHAT)
    r = sdk.chat.completions.create(model="smol-remote", **CHAT)
    assert r.model == "smol-remote"
    assert r.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert r.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"], expected["usage"]["completion_tokens"])
    chunks = list(sdk.chat.completions.create(model="smol-remote", stream=True,
                                              stream_options={"include_usage": True}, **CHAT))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["choices"][0]["message"]["content"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        expected["choices"][0]["finish_reason"]]
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)


def test_prefix_completion_is_continued_by_the_upstream(sdk, upstreams):
    """DeepSeek's prefix (and vLLM's continue_final_message) reach the upstream as vLLM's fields: the upstream
    continues the assistant's message instead of opening a new turn."""
    prefixed = {**CHAT, "messages": CHAT["messages"] + [{"role": "assistant", "content": "My favourite colour is",
                                                         "prefix": True}]}
    expected = direct(upstreams[1], "/v1/chat/completions", prefixed)
    opened = direct(upstreams[1], "/v1/chat/completions", CHAT)
    assert expected["usage"]["prompt_tokens"] > opened["usage"]["prompt_tokens"]
    r = sdk.chat.completions.create(model="smol-remote", **prefixed)
    assert r.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert r.usage.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_completions_with_text_prompts(sdk, upstreams):
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    expected = direct(upstreams[0], "/v1/completions", body)
    r = sdk.completions.create(model="smol-remote", **body)
    assert r.choices[0].text == expected["choices"][0]["text"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"], expected["usage"]["completion_tokens"])
    streamed = list(sdk.completions.create(model="smol-remote", stream=True, **body))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    # the upstream reports no prompt logprobs: echo + logprobs would score nothing, silently
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.completions.create(model="smol-remote", echo=True, logprobs=1, **body)
    assert refused.value.body["param"] == "echo"


def test_every_dialect_through_the_gateway(front, upstreams):
    expected = direct(upstreams[1], "/v1/chat/completions", CHAT)
    content, usage = expected["choices"][0]["message"]["content"], expected["usage"]
    with http(front) as client:
        workers = client.post("/client/v4/accounts/acct/ai/run/@cf/smol-remote", json=CHAT).json()
        assert workers["success"] is True and workers["result"]["response"] == content
        assert workers["result"]["usage"]["prompt_tokens"] == usage["prompt_tokens"]
        with client.stream("POST", "/client/v4/accounts/acct/ai/run/smol-remote", json={**CHAT, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        parsed = [json.loads(e) for e in events[:-1]]
        assert "".join(e["response"] for e in parsed) == content
        assert parsed[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]
        dataoorts = client.post("/api/v1", json={"model": "smol-remote", "data": CHAT}).json()
        assert dataoorts["success"] is True and dataoorts["result"]["response"] == content
    with httpx.Client(base_url=front.root_url, timeout=120) as client:  # Segmind reads only x-api-key
        segmind = client.post("/v1/smol-remote", json=CHAT, headers={"x-api-key": OPERATOR_KEY})
        assert segmind.status_code == 200, segmind.text
        assert segmind.json()["choices"][0]["message"]["content"] == content
        assert segmind.json()["usage"]["prompt_tokens"] == usage["prompt_tokens"]


def open_stream(client: httpx.Client, content: str, max_tokens: int = 600):
    """A streaming chat held open: its first event has arrived, so its upstream request is running."""
    context = client.stream("POST", "/v1/chat/completions", json={
        "model": "smol-remote", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "ignore_eos": True, "stream": True})
    response = context.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))
    return context, lines


def served_by(upstreams: list[RunningServer], before: list[int]) -> list[int]:
    return [upstream_stats(u)["num_requests_finished"] - n for u, n in zip(upstreams, before)]


def test_least_outstanding_spreads_and_a_shared_long_prefix_sticks_to_one_upstream(front, upstreams):
    wait_idle(upstreams)
    before = [upstream_stats(u)["num_requests_finished"] for u in upstreams]
    with http(front) as c1, http(front) as c2:
        streams = [open_stream(c1, "Count to one hundred."), open_stream(c2, "Count to two hundred.")]
        for context, _ in streams:
            context.__exit__(None, None, None)
    wait_idle(upstreams)
    assert served_by(upstreams, before) == [1, 1]  # the second went where nothing was in flight

    before = [upstream_stats(u)["num_requests_finished"] for u in upstreams]
    clients = [http(front) for _ in range(3)]
    try:
        streams = [open_stream(c, PREFIX + f"Question {i}: what do you sell?") for i, c in enumerate(clients)]
        for context, _ in streams:
            context.__exit__(None, None, None)
    finally:
        for c in clients:
            c.close()
    wait_idle(upstreams)
    assert sorted(served_by(upstreams, before)) == [0, 3]  # all three where their prefix is cached


def test_a_client_that_hangs_up_cancels_the_upstream_request(front, upstreams):
    wait_idle(upstreams)
    generated = sum(upstream_stats(u)["num_generated_tokens"] for u in upstreams)
    with http(front) as client:
        context, lines = open_stream(client, "Write a long story.", max_tokens=900)
        for _ in range(3):
            next(lines)
        context.__exit__(None, None, None)
    wait_idle(upstreams)  # the upstream's sequence was aborted, not run to its 900 tokens
    assert sum(upstream_stats(u)["num_generated_tokens"] for u in upstreams) - generated < 900


def test_an_upstream_down_before_the_first_token_fails_over_then_is_ejected(sdk, front):
    assert front_stats(front, "smol-failover")["num_failovers"] == 0
    r = sdk.chat.completions.create(model="smol-failover", **CHAT)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    stats = front_stats(front, "smol-failover")
    dead, alive = stats["upstreams"]
    assert stats["num_failovers"] == 1
    assert (dead["name"], dead["num_failures"], dead["ejected"]) == ("dead", 1, True)
    assert (alive["num_requests"], alive["num_failures"]) == (1, 0)
    chunks = list(sdk.chat.completions.create(model="smol-failover", stream=True, **CHAT))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    stats = front_stats(front, "smol-failover")
    assert stats["num_failovers"] == 1 and stats["upstreams"][0]["num_requests"] == 1  # ejected: not tried


def test_no_upstream_left_is_a_503_in_each_dialect_and_costs_nothing(sdk, front):
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="smol-down", **CHAT)
    assert caught.value.status_code == 503 and "No upstream of smol-down" in caught.value.message
    assert "127.0.0.1" not in caught.value.message  # upstream addresses stay in the operator's log
    with http(front) as client:
        workers = client.post("/client/v4/accounts/acct/ai/run/smol-down", json=CHAT)
        assert workers.status_code == 503 and workers.json()["success"] is False
        stream = client.post("/v1/chat/completions", json={"model": "smol-down", "stream": True, **CHAT})
        assert stream.status_code == 503 and stream.json()["error"]["type"] == "service_unavailable"


def test_an_upstream_refusal_is_the_clients_400(sdk):
    with pytest.raises(openai.BadRequestError) as caught:  # 1000 + the prompt do not fit the upstream's 1024
        sdk.chat.completions.create(model="smol-remote", messages=CHAT["messages"], max_tokens=1020)
    assert "maximum context length" in caught.value.message


def set_price_and_key(front: RunningServer, account: str, credits: int) -> str:
    with httpx.Client(base_url=front.root_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
        assert admin.put("/admin/prices/smol-remote", json=PRICE).status_code == 200
        r = admin.post("/admin/keys", json={"account": account})
        assert r.status_code == 201, r.text
        assert admin.post("/admin/credits", json={"account": account, "amount_nanodollars": credits}).status_code == 200
        return r.json()["key"]


def admin_get(front: RunningServer, path: str, **params: Any) -> dict[str, Any]:
    with httpx.Client(base_url=front.root_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
        r = admin.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()


def cost(usage: dict[str, int]) -> int:
    """PRICE in nano-dollars per token: 1000 a prompt token, 250 a cached one, 2000 a completion token."""
    return (1000 * (usage["num_prompt_tokens"] - usage["num_cached_tokens"]) + 250 * usage["num_cached_tokens"]
            + 2000 * usage["num_completion_tokens"])


def test_a_remote_model_is_billed_from_the_upstreams_usage(front):
    key = set_price_and_key(front, "remote-buyer", 10**9)
    client = openai.OpenAI(base_url=front.base_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="smol-remote", **CHAT)
    r = raw.parse()
    (row,) = admin_get(front, "/admin/usage", account="remote-buyer")["data"]
    assert (row["num_prompt_tokens"], row["num_completion_tokens"], row["num_cached_tokens"]) == (
        r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens)
    assert row["cost_nanodollars"] == cost(row) > 0
    account = admin_get(front, "/admin/accounts/remote-buyer")
    assert (account["balance_nanodollars"], account["reserved_nanodollars"]) == (10**9 - cost(row), 0)
    assert raw.headers["x-remaining-credits"]


def test_an_upstream_killed_mid_stream_ends_with_an_error_event_and_only_delivery_is_charged(front, upstreams):
    """Last: kills upstream a."""
    a, b = upstreams
    wait_idle(upstreams)
    key = set_price_and_key(front, "cut-short", 10**9)
    before_b = upstream_stats(b)["num_requests_finished"]
    with http(front, key) as client:
        body = {"model": "smol-remote", "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 900, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            events: list[str] = []
            for line in lines:  # up to the first content: the request runs on a (idle, listed first)
                if line.startswith("data: "):
                    events.append(line[6:])
                    if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break
            a.process.send_signal(signal.SIGKILL)
            a.process.wait()
            events += [line[6:] for line in lines if line.startswith("data: ")]
    assert upstream_stats(b)["num_requests_finished"] == before_b  # no failover after the first token
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    errors = [e for e in parsed if "error" in e]
    assert len(errors) == 1 and "the upstream failed mid-stream" in errors[0]["error"]["message"]
    assert not any(c["choices"][0]["finish_reason"] for c in parsed if c.get("choices"))  # not a normal end
    delivered = sum(1 for c in parsed if c.get("choices") and c["choices"][0]["delta"].get("content"))
    assert delivered >= 1
    (row,) = admin_get(front, "/admin/usage", account="cut-short")["data"]
    # deepserve upstreams report no running usage: the prompt count died with a, the chunks were delivered
    assert (row["num_completion_tokens"], row["num_prompt_tokens"]) == (delivered, 0)
    assert row["cost_nanodollars"] == 2000 * delivered

    deadline = time.monotonic() + 60  # active health checks notice a is gone (bounded poll)
    while front_stats(front, "smol-remote")["upstreams"][0]["healthy"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sdk = openai.OpenAI(base_url=front.base_url, api_key=OPERATOR_KEY, max_retries=0)
    r = sdk.chat.completions.create(model="smol-remote", **CHAT)
    assert r.choices[0].message.content  # b serves alone
    assert upstream_stats(b)["num_requests_finished"] == before_b + 1
