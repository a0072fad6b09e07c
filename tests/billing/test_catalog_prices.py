"""Prices from the catalog, operator overrides, and reasoning billed as output, through the real engine.

The bundled SmolLM2 weights are served as `deepseek-math-7b-instruct`, so the server takes that model's
catalog facts, among them Dataoorts' price ($0.10 per million input tokens, $0.11 per million output tokens:
100 and 110 nano-dollars a token), with DeepSeek-R1's chat template, whose prompt opens `<think>`: every
answer starts with reasoning, which a reasoning budget cuts after exactly BUDGET tokens.
"""

from __future__ import annotations

import httpx
import pytest

from deepserve.bundled import bundled_model_path
from tests.billing.servers import Billed, start_billing_server

MODEL = "deepseek-math-7b-instruct"
INPUT, OUTPUT = 100, 110  # nano-dollars a token: $0.10 and $0.11 per million
BUDGET = 4


@pytest.fixture(scope="module")
def math(tmp_path_factory) -> Billed:
    url = f"sqlite:///{tmp_path_factory.mktemp('billing-catalog') / 'billing.db'}"
    running = start_billing_server(url, "--model-path", str(bundled_model_path()), "--model-id", MODEL,
                                   "--template", "deepseek-r1")
    server = Billed(running, db_url=url)
    yield server
    running.stop()


def ask(http: httpx.Client, key: str, **fields) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is two plus two?"}], "max_tokens": 12,
            "temperature": 0, "max_reasoning_tokens": BUDGET, **fields}
    r = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_catalog_price_is_listed_and_charged(math):
    key = math.new_key("catalog", 10**9)
    with httpx.Client(base_url=math.url, timeout=60) as http:
        card = http.get(f"/v1/models/{MODEL}", headers={"Authorization": f"Bearer {key}"}).json()
        assert card["pricing"] == {"unit": "nanodollars_per_million_tokens", "input": 100_000_000,
                                   "cached_input": 100_000_000, "output": 110_000_000}
        with math.admin() as admin:
            (served,) = admin.get("/admin/prices").json()["served"]
        assert served["source"] == "catalog" and served["input"] == 100_000_000 and served["output"] == 110_000_000
        usage = ask(http, key)["usage"]
    charge = usage["prompt_tokens"] * INPUT + usage["completion_tokens"] * OUTPUT
    (row,) = math.usage("catalog")
    assert row["cost_nanodollars"] == charge and row["model"] == MODEL
    assert math.account("catalog")["balance_nanodollars"] == 10**9 - charge
    math.check_ledger("catalog")


def test_hidden_reasoning_is_billed_as_output_like_shown_reasoning(math):
    key = math.new_key("thinker", 10**9)
    with httpx.Client(base_url=math.url, timeout=60) as http:
        shown = ask(http, key, reasoning_format="deepseek")
        hidden = ask(http, key, reasoning_format="hidden")
    assert shown["choices"][0]["message"]["reasoning_content"]  # there was reasoning to hide
    assert "reasoning_content" not in hidden["choices"][0]["message"]
    assert "<think>" not in (hidden["choices"][0]["message"]["content"] or "")
    for answer in (shown, hidden):
        assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == BUDGET
    assert hidden["usage"] == shown["usage"]  # greedy: the same tokens, whatever is shown of them
    (row,) = math.usage("thinker")
    assert row["num_reasoning_tokens"] == 2 * BUDGET
    assert row["num_completion_tokens"] == 2 * hidden["usage"]["completion_tokens"] > 2 * BUDGET
    assert row["cost_nanodollars"] == 2 * (hidden["usage"]["prompt_tokens"] * INPUT
                                           + hidden["usage"]["completion_tokens"] * OUTPUT)


def test_an_operator_price_overrides_the_catalog_until_it_is_removed(math):
    key = math.new_key("override", 10**9)
    with httpx.Client(base_url=math.url, timeout=60) as http, math.admin() as admin:
        # by the catalog id: an override applies to whatever name the model is served under
        put = admin.put("/admin/prices/deepseek-ai/deepseek-math-7b-instruct",
                        json={"input": 1_000_000_000, "cached_input": 500_000_000, "output": 3_000_000_000})
        assert put.status_code == 200
        assert admin.get("/admin/prices").json()["served"][0]["source"] == "operator"
        dear = ask(http, key)["usage"]
        assert admin.delete("/admin/prices/deepseek-ai/deepseek-math-7b-instruct").status_code == 200
        cheap = ask(http, key)["usage"]
    # the second prompt may hit the prompt cache: at the catalog price cached tokens cost the same
    expected = [dear["prompt_tokens"] * 1000 - dear["prompt_tokens_details"]["cached_tokens"] * 500
                + dear["completion_tokens"] * 3000,
                cheap["prompt_tokens"] * INPUT + cheap["completion_tokens"] * OUTPUT]
    (row,) = math.usage("override")
    assert row["cost_nanodollars"] == sum(expected)
    assert math.account("override")["balance_nanodollars"] == 10**9 - sum(expected)
