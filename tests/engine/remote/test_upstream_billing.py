"""Billing a model served upstream whose chat template is long, through real HTTP end to end: a deepserve front
(SQLite ledger) in front of a deepserve upstream serving a tiny GGUF whose template writes a long preamble.

The front cannot count an upstream's prompt before sending it, so it reserves for a bound of it. The first
request's prompt, counted by the upstream, is far beyond that bound: it is charged in full from the free
balance (not capped at the reservation), and the front learns the template's size, so a later request from an
account that cannot pay for such a prompt is refused (402) before anything is sent."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.billing.servers import ADMIN_KEY, PRICE, start_billing_server
from tests.server import start_server
from tests.tiny_gguf import build_tiny_gguf

UPSTREAM_KEY = "sk-upstream-secret-4c1f"
PREAMBLE = "The quick brown fox jumps over the lazy dog. " * 40  # several hundred tokens the client never sees
TEMPLATE = ("{{ bos_token }}" + PREAMBLE +
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
CHAT = {"model": "long-template", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upstream-billing")
    gguf = build_tiny_gguf(folder / "long-template.gguf", "deepseek-math", chat_template=TEMPLATE)
    upstream = start_server("--model-path", str(gguf), "--ctx-size", "2048", "--parallel", "2",
                            api_key=UPSTREAM_KEY)
    config = {"models": [{"id": "long-template", "upstream_model": upstream.model, "context_window": 2048,
                          "upstreams": [{"url": upstream.base_url, "api_key": UPSTREAM_KEY}]}]}
    (folder / "models.yaml").write_text(json.dumps(config))
    running = start_billing_server(f"sqlite:///{folder / 'billing.db'}", "--config", str(folder / "models.yaml"))
    try:
        with admin(running) as client:
            assert client.put("/admin/prices/long-template", json=PRICE).status_code == 200
        yield running
    finally:
        running.stop()
        upstream.stop()


def admin(front) -> httpx.Client:
    return httpx.Client(base_url=front.root_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


def new_key(front, account: str, credits: int) -> str:
    with admin(front) as client:
        key = client.post("/admin/keys", json={"account": account}).json()["key"]
        assert client.post("/admin/credits", json={"account": account, "amount_nanodollars": credits}).status_code == 200
    return key


def account(front, name: str) -> dict:
    with admin(front) as client:
        return client.get(f"/admin/accounts/{name}").json()


def test_a_prompt_beyond_the_reservation_is_charged_in_full_and_later_reservations_cover_it(front):
    first = openai.OpenAI(base_url=front.base_url, api_key=new_key(front, "first", 10**9), max_retries=0)
    answer = first.chat.completions.create(**CHAT)
    prompt = answer.usage.prompt_tokens
    assert prompt > 200  # the upstream's count: the preamble, far beyond the front's bound for "Hi"
    with admin(front) as client:
        (row,) = client.get("/admin/usage", params={"account": "first"}).json()["data"]
    expected = prompt * 1000 + answer.usage.completion_tokens * 2000  # PRICE per token, nothing cached
    assert (row["num_prompt_tokens"], row["cost_nanodollars"]) == (prompt, expected)  # not capped at the reservation
    assert (account(front, "first")["balance_nanodollars"], account(front, "first")["reserved_nanodollars"]) == (
        10**9 - expected, 0)

    # Enough for the bound the front knew at first, not for the prompt the upstream counts: now refused up front.
    poor = openai.OpenAI(base_url=front.base_url, api_key=new_key(front, "poor", prompt // 2 * 1000), max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        poor.chat.completions.create(**CHAT)
    assert refused.value.status_code == 402
    assert account(front, "poor")["balance_nanodollars"] == prompt // 2 * 1000  # nothing charged, nothing sent
    with admin(front) as client:
        assert client.get("/admin/usage", params={"account": "poor"}).json()["data"] == []


def test_max_tokens_past_the_upstreams_window_is_a_400_in_each_dialect(front):
    key = new_key(front, "window", 10**9)
    with httpx.Client(base_url=front.root_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        openai_answer = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5000})
        assert openai_answer.status_code == 400 and openai_answer.json()["error"]["code"] == "context_length_exceeded"
        workers = client.post("/client/v4/accounts/acct/ai/run/long-template",
                              json={"messages": CHAT["messages"], "max_tokens": 5000})
        assert workers.status_code == 400 and "maximum context length is 2048" in workers.json()["errors"][0]["message"]
    assert account(front, "window")["balance_nanodollars"] == 10**9
