"""Billing through the real engine and real HTTP, in every dialect: refusals before any generation (402 / 406 /
3036 / 402), charges equal to the usage clients saw, 200 concurrent requests that never overspend, idempotent
retries charged once, revocation at once, per-model keys, rate limits, aborted streams, the admin API and
DeepSeek's /user/balance."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from deepserve.billing.money import cost, dollars, parse_dollars, TokenPrices
from tests.billing.servers import (
    ADMIN_KEY,
    OPERATOR_KEY,
    PRICE,
    REFUSED_STATUS,
    Billed,
    assert_refused,
    dialect_request,
    fire,
    start_billing_server,
    usage_of,
)

PRICES = TokenPrices(**PRICE)
FLAT = TokenPrices(**{**PRICE, "cached_input": PRICE["input"]})
DIALECTS = list(REFUSED_STATUS)


@pytest.fixture(scope="module")
def billed(tmp_path_factory) -> Billed:
    folder = tmp_path_factory.mktemp("billing-http")
    url = f"sqlite:///{folder / 'billing.db'}"
    running = start_billing_server(url)
    server = Billed(running, db_url=url)
    server.set_price()
    yield server
    running.stop()


def charge_of(usage: dict, prices: TokenPrices = PRICES) -> int:
    """The charge for a reported usage; Workers AI and Dataoorts report no cached count (then none is assumed)."""
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return cost(prices, num_prompt=usage["prompt_tokens"], num_cached=cached, num_completion=usage["completion_tokens"])


@pytest.mark.parametrize("dialect", DIALECTS)
def test_an_empty_balance_is_refused_in_each_dialects_own_way_before_generating(billed, dialect):
    key = billed.new_key(f"broke-{dialect}")
    engine_before = billed.engine_counters()
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        r = http.request(**dialect_request(dialect, billed.model, key))
        assert_refused(dialect, r)
        assert r.headers["x-remaining-credits"] == "0.00"
        streamed = http.request(**dialect_request(dialect, billed.model, key, stream=True)) \
            if dialect != "dataoorts" else r
        assert_refused(dialect, streamed)  # a stream is refused before its first byte, with a status
    assert billed.usage(f"broke-{dialect}") == []
    assert billed.account(f"broke-{dialect}")["reserved_nanodollars"] == 0
    assert billed.engine_counters() == engine_before  # the engine never saw the refused requests


def test_the_openai_sdk_sees_deepseeks_402(billed):
    client = openai.OpenAI(base_url=billed.url + "/v1", api_key=billed.new_key("sdk-broke"), max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=billed.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert caught.value.status_code == 402
    assert caught.value.body["code"] == "insufficient_balance"
    with pytest.raises(openai.APIStatusError) as completions:
        client.completions.create(model=billed.model, prompt="Hi", max_tokens=4)
    assert completions.value.status_code == 402


def test_a_default_max_tokens_is_what_the_balance_covers_rather_than_a_402(billed):
    """A client that leaves max_tokens out (DeepSeek's usually do) would be reserved for the whole window: it gets
    as many tokens as its balance covers instead (finish_reason length), and never a balance below zero; a
    max_tokens it asked for is still held in full (402)."""
    messages = [{"role": "user", "content": "Tell me a long story."}]
    with httpx.Client(base_url=billed.url, headers={"Authorization": f"Bearer {OPERATOR_KEY}"}, timeout=60) as http:
        num_prompt = http.post("/tokenize", json={"model": billed.model, "messages": messages}).json()["count"]
    credits = num_prompt * 1000 + 5 * 2000  # PRICE: the prompt and five completion tokens, at worst
    client = openai.OpenAI(base_url=billed.url + "/v1", api_key=billed.new_key("thrifty", credits), max_retries=0)
    with pytest.raises(openai.APIStatusError) as asked:
        client.chat.completions.create(model=billed.model, messages=messages, max_tokens=50)
    assert asked.value.status_code == 402
    r = client.chat.completions.create(model=billed.model, messages=messages, extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 5)
    account = billed.account("thrifty")
    assert account["balance_nanodollars"] == credits - charge_of(r.usage.model_dump()) >= 0
    assert account["reserved_nanodollars"] == 0


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_dialects_default_max_tokens_fits_the_balance(billed, dialect):
    """Without max_tokens (Workers AI and Dataoorts default to 256, Segmind and OpenAI to the window), a balance
    that covers the prompt and three tokens gets those three."""
    request = dialect_request(dialect, billed.model, OPERATOR_KEY, ignore_eos=True)
    body = request["json"]["data"] if dialect == "dataoorts" else request["json"]
    del body["max_tokens"]
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        free = http.request(**request)
        assert free.status_code == 200, free.text
        num_prompt = usage_of(dialect, free.json())["prompt_tokens"]
        key = billed.new_key(f"thrifty-{dialect}", num_prompt * 1000 + 3 * 2000)
        request["headers"] = {"x-api-key": key} if dialect == "segmind" else {"Authorization": f"Bearer {key}"}
        r = http.request(**request)
    assert r.status_code == 200, r.text
    assert usage_of(dialect, r.json())["completion_tokens"] == 3
    assert billed.account(f"thrifty-{dialect}")["balance_nanodollars"] >= 0


@pytest.fixture()
def flat_prompt_price(billed):
    """Cached prompt tokens at the full input price: Workers AI and Dataoorts report no cached count, and their
    clients must still be able to check the charge."""
    billed.set_price({**PRICE, "cached_input": FLAT.cached_input})
    yield
    billed.set_price()


def test_every_dialect_is_charged_exactly_the_usage_it_reported(billed, flat_prompt_price):
    granted = 1_000_000_000
    key = billed.new_key("payer", granted)
    seen: list[dict] = []
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        for dialect in DIALECTS:
            r = http.request(**dialect_request(dialect, billed.model, key, max_tokens=6))
            assert r.status_code == 200, r.text
            seen.append(usage_of(dialect, r.json()))
            after = granted - sum(charge_of(u, FLAT) for u in seen)
            assert r.headers["x-remaining-credits"] == dollars(after)  # the balance after this call
        r = http.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": billed.model, "prompt": ["One", "Two"], "max_tokens": 3, "n": 2})
        assert r.status_code == 200
        seen.append(r.json()["usage"])
        with http.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": billed.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                               "stream": True, "stream_options": {"include_usage": True}}) as stream:
            assert "x-remaining-credits" in stream.headers  # after the reservation
            events = [json.loads(line[6:]) for line in stream.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        seen.append(events[-1]["usage"])
        balance = http.get("/user/balance", headers={"Authorization": f"Bearer {key}"})
    expected = sum(charge_of(u, FLAT) for u in seen)
    rows = billed.usage("payer")
    assert sum(r["num_requests"] for r in rows) == len(seen)
    assert sum(r["num_prompt_tokens"] for r in rows) == sum(u["prompt_tokens"] for u in seen)
    assert sum(r["num_completion_tokens"] for r in rows) == sum(u["completion_tokens"] for u in seen)
    assert sum(r["cost_nanodollars"] for r in rows) == expected
    account = billed.account("payer")
    assert (account["balance_nanodollars"], account["reserved_nanodollars"]) == (granted - expected, 0)
    assert balance.json() == {"is_available": True, "balance_infos": [{
        "currency": "USD", "total_balance": dollars(granted - expected), "granted_balance": dollars(granted - expected),
        "topped_up_balance": "0.00"}]}


def test_200_concurrent_requests_never_overspend_and_the_ledger_equals_the_usage(billed, flat_prompt_price):
    probe = billed.new_key("probe", 10**9)
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        worst = {}
        for dialect in DIALECTS:  # the worst case of one request in each dialect: prompt + 4 output tokens
            body = http.request(**dialect_request(dialect, billed.model, probe)).json()
            worst[dialect] = cost(FLAT, num_prompt=usage_of(dialect, body)["prompt_tokens"], num_cached=0,
                                  num_completion=4)
    granted = 20 * max(worst.values())  # covers about 20 of the 200
    key = billed.new_key("crowd", granted)
    requests = [dialect_request(DIALECTS[i % 4], billed.model, key) for i in range(200)]
    responses = asyncio.run(fire(billed.url, requests))
    served = refused = 0
    charged = num_prompt = num_completion = 0
    for i, r in enumerate(responses):
        dialect = DIALECTS[i % 4]
        if r.status_code == 200:
            served += 1
            usage = usage_of(dialect, r.json())
            charged += charge_of(usage, FLAT)
            num_prompt += usage["prompt_tokens"]
            num_completion += usage["completion_tokens"]
        else:
            assert_refused(dialect, r)
            refused += 1
    assert served >= 20 and refused > 0 and served + refused == 200
    account = billed.account("crowd")
    assert account["reserved_nanodollars"] == 0
    assert 0 <= account["balance_nanodollars"] == granted - charged
    rows = billed.usage("crowd")
    assert sum(r["num_requests"] for r in rows) == served
    assert sum(r["cost_nanodollars"] for r in rows) == charged
    assert sum(r["num_prompt_tokens"] for r in rows) == num_prompt
    assert sum(r["num_completion_tokens"] for r in rows) == num_completion
    billed.check_ledger("crowd")  # the balance is still the sum of its ledger rows


def test_a_retry_with_the_same_idempotency_key_gets_the_identical_body_and_is_charged_once(billed):
    key = billed.new_key("retrier", 10**9)
    body = {"model": billed.model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8,
            "temperature": 1.0}
    with httpx.Client(base_url=billed.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
        first = http.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "retry-1"})
        again = http.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "retry-1"})
        assert first.status_code == again.status_code == 200
        assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
        assert again.headers["x-remaining-credits"] == first.headers["x-remaining-credits"]
        fresh = http.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "retry-2"})
        assert fresh.json()["id"] != first.json()["id"]
        other = http.post("/v1/chat/completions", json={**body, "max_tokens": 9}, headers={"Idempotency-Key": "retry-1"})
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        streamed = [http.post("/v1/chat/completions", json={**body, "stream": True}, headers={"Idempotency-Key": "s-1"})
                    for _ in range(2)]
        assert streamed[0].content == streamed[1].content and streamed[0].content.endswith(b"data: [DONE]\n\n")
        segmind = [http.post("/v1/deepseek-reasoner", json={"messages": body["messages"], "max_tokens": 4},
                             headers={"x-api-key": key, "Idempotency-Key": "seg-1"}) for _ in range(2)]
        assert segmind[0].content == segmind[1].content
    assert sum(r["num_requests"] for r in billed.usage("retrier")) == 4  # retry-1, retry-2, s-1, seg-1


def test_a_duplicate_still_in_flight_gets_409_then_the_answer(billed):
    key = billed.new_key("impatient", 10**9)
    body = {"model": billed.model, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 48,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "slow-1"}
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # the first answer has started
            duplicate = http.post("/v1/chat/completions", json=body, headers=headers)
            assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "idempotency_key_in_use"
            original = "\n".join(["x", *lines])
        replay = http.post("/v1/chat/completions", json=body, headers=headers)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.text.rstrip().endswith("data: [DONE]") and original.rstrip().endswith("data: [DONE]")
    assert sum(r["num_requests"] for r in billed.usage("impatient")) == 1


@pytest.mark.parametrize(("dialect", "status"), [("openai", 401), ("segmind", 401), ("workers_ai", 401),
                                                 ("dataoorts", 401)])
def test_a_revoked_key_gets_401_at_once(billed, dialect, status):
    key = billed.new_key(f"revoked-{dialect}", 10**9)
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        assert http.request(**dialect_request(dialect, billed.model, key)).status_code == 200
        with billed.admin() as admin:
            prefix = key[:10]
            assert admin.delete(f"/admin/keys/{prefix}").json()["state"] == "revoked"
        r = http.request(**dialect_request(dialect, billed.model, key))
    assert r.status_code == status
    assert key not in r.text and "revoked" in r.text


def test_a_key_for_other_models_gets_403_and_may_use_its_own(billed):
    key = billed.new_key("narrow", 10**9, allowed_models=["deepseek-r1-32b"])
    wide = billed.new_key("by-alias", 10**9, allowed_models=["HuggingFaceTB/SmolLM2-135M-Instruct"])
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        r = http.request(**dialect_request("openai", billed.model, key))
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        assert "deepseek-r1-32b" in r.json()["error"]["message"]
        cf = http.request(**dialect_request("workers_ai", billed.model, key))
        assert cf.status_code == 403 and cf.json()["errors"][0]["code"] == 5018
        assert http.request(**dialect_request("openai", billed.model, wide)).status_code == 200  # an alias names it
    assert billed.usage("narrow") == []


def test_a_rate_limited_key_gets_429_with_retry_after_and_ratelimit_headers(billed):
    key = billed.new_key("limited", 10**9, rpm_limit=2, tpm_limit=10_000)
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        ok = [http.request(**dialect_request("openai", billed.model, key)) for _ in range(2)]
        assert [r.status_code for r in ok] == [200, 200]
        assert ok[0].headers["x-ratelimit-limit-requests"] == "2"
        assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["1", "0"]
        assert ok[0].headers["x-ratelimit-limit-tokens"] == "10000"
        limited = http.request(**dialect_request("openai", billed.model, key))
        cf = http.request(**dialect_request("workers_ai", billed.model, key))
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 30
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert cf.status_code == 429 and cf.headers["retry-after"]
    assert sum(r["num_requests"] for r in billed.usage("limited")) == 2


def test_a_stream_the_client_leaves_is_charged_for_what_was_delivered_and_releases_the_rest(billed):
    key = billed.new_key("leaver", 10**9)
    body = {"model": billed.model, "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            received = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    received += 1
                    if received == 5:
                        break  # hang up mid-stream
    (row,) = billed.wait_for_usage("leaver", 1)
    assert 5 <= row["num_completion_tokens"] < 400
    account = billed.account("leaver")
    assert account["reserved_nanodollars"] == 0
    assert account["balance_nanodollars"] == 10**9 - row["cost_nanodollars"]
    assert row["cost_nanodollars"] == cost(PRICES, num_prompt=row["num_prompt_tokens"], num_cached=0,
                                           num_completion=row["num_completion_tokens"])


def test_a_client_gone_while_its_request_waited_for_a_slot_is_charged_nothing(billed):
    """Every slot busy (the operator's long streams), a metered request queued behind them, its client hangs up
    before it gets a slot: nothing of it was computed, so nothing is charged and the reservation is released."""
    key = billed.new_key("queued-leaver", 10**9)
    long_body = {"model": billed.model, "messages": [{"role": "user", "content": "Write a long essay."}],
                 "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=billed.url, timeout=60) as http:
            fillers = []
            for _ in range(8):  # --parallel 8: every slot
                request = http.build_request("POST", "/v1/chat/completions", json=long_body,
                                             headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
                fillers.append(await http.send(request, stream=True))
            waiter = await http.send(http.build_request(
                "POST", "/v1/chat/completions", json={**long_body, "max_tokens": 50},
                headers={"Authorization": f"Bearer {key}"}), stream=True)
            assert waiter.status_code == 200
            for _ in range(600):  # until the engine reports it queued (bounded; no sleep as synchronisation)
                stats = (await http.get("/health")).json()["engines"][0]
                if stats["num_running"] == 8 and stats["num_waiting"] == 1:
                    break
            assert stats["num_waiting"] == 1
            await waiter.aclose()  # hang up before it got a slot
            for response in fillers:
                await response.aclose()

    asyncio.run(scenario())
    (row,) = billed.wait_for_usage("queued-leaver", 1)
    assert (row["num_prompt_tokens"], row["num_completion_tokens"], row["cost_nanodollars"]) == (0, 0, 0)
    account = billed.account("queued-leaver")
    assert account["reserved_nanodollars"] == 0 and account["balance_nanodollars"] == 10**9


def test_operator_keys_are_not_metered(billed):
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        r = http.request(**dialect_request("openai", billed.model, OPERATOR_KEY))
        assert r.status_code == 200 and "x-remaining-credits" not in r.headers
        seg = http.request(**dialect_request("segmind", billed.model, OPERATOR_KEY))
        assert seg.status_code == 200 and "x-remaining-credits" not in seg.headers  # no account: no "0" to misread
        balance = http.get("/user/balance", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}).json()
    assert balance == {"is_available": True, "balance_infos": []}


def test_the_admin_api_needs_the_admin_key(billed):
    user_key = billed.new_key("nosy", 10**9)
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        assert http.get("/admin/accounts").status_code == 401
        assert http.get("/admin/accounts", headers={"Authorization": f"Bearer {user_key}"}).status_code == 401
        assert http.get("/admin/accounts", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}).status_code == 401
        ok = http.get("/admin/accounts", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert ok.status_code == 200 and "nosy" in {a["name"] for a in ok.json()["data"]}
    with billed.admin() as admin:
        listed = admin.get("/admin/keys", params={"account": "nosy"}).json()["data"]
        assert [k["prefix"] for k in listed] == [user_key[:10]] and user_key not in json.dumps(listed)
        bad = admin.post("/admin/credits", json={"account": "nosy", "amount_usd": "1.0000000001"})
        assert bad.status_code == 400 and "9 decimals" in bad.text
        taken = admin.post("/admin/credits", json={"account": "nosy", "amount_usd": "-5"})
        assert taken.status_code == 400 and "available balance" in taken.text
        assert admin.get("/admin/accounts/nobody").status_code == 404
        prices = admin.get("/admin/prices").json()
        assert prices["served"][0] == {"model": billed.model, "source": "operator", "unit":
                                       "nanodollars_per_million_tokens", **PRICE}


# ---- clients that retry: the openai SDK retries 408/409/429/5xx ----------------------------------------
class LoseFirstAnswer(httpx.BaseTransport):
    """The server answers, but the answer is lost on the way back (a proxy's 502): the SDK retries. The first
    attempt of each Idempotency-Key (or of each call without one) is lost; what the server sent is kept."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.lost: list[bytes] = []
        self.sent: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        response = self._inner.handle_request(request)
        if request.headers.get("x-stainless-retry-count", "0") != "0":
            return response
        response.read()
        response.close()
        self.lost.append(response.content)
        return httpx.Response(502, json={"error": {"message": "bad gateway"}}, request=request)

    def close(self) -> None:
        self._inner.close()


def _sse_payloads(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_the_openai_sdk_retrying_a_lost_answer_with_an_idempotency_key_gets_it_and_pays_once(billed):
    granted = 10**9
    key = billed.new_key("sdk-retrier", granted)
    transport = LoseFirstAnswer()
    client = openai.OpenAI(base_url=billed.url + "/v1", api_key=key, max_retries=2,
                           http_client=httpx.Client(transport=transport, timeout=60))
    messages = [{"role": "user", "content": "Tell me a story."}]
    answer = client.chat.completions.create(model=billed.model, messages=messages, max_tokens=8, temperature=1.0,
                                            extra_headers={"Idempotency-Key": "sdk-once"})
    lost = json.loads(transport.lost[0])
    assert [r.headers["idempotency-key"] for r in transport.sent] == ["sdk-once", "sdk-once"]  # one SDK retry
    assert answer.id == lost["id"] and answer.choices[0].message.content == lost["choices"][0]["message"]["content"]
    chunks = list(client.chat.completions.create(
        model=billed.model, messages=messages, max_tokens=8, temperature=1.0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"Idempotency-Key": "sdk-stream"}))
    lost_stream = _sse_payloads(transport.lost[1])
    assert [c.id for c in chunks] == [e["id"] for e in lost_stream] and len(transport.sent) == 4
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
        e["choices"][0]["delta"].get("content") or "" for e in lost_stream if e["choices"])
    charged = charge_of(answer.usage.model_dump()) + charge_of(chunks[-1].usage.model_dump())
    assert sum(r["num_requests"] for r in billed.usage("sdk-retrier")) == 2  # one generation each, not two
    account = billed.account("sdk-retrier")
    assert (account["balance_nanodollars"], account["reserved_nanodollars"]) == (granted - charged, 0)
    # Control: without the header the same lost answer is generated (and charged) again.
    client.chat.completions.create(model=billed.model, messages=messages, max_tokens=8)
    assert sum(r["num_requests"] for r in billed.usage("sdk-retrier")) == 4
    client.close()


def test_concurrent_duplicates_and_sdk_retries_never_overspend_and_each_key_pays_once(billed, flat_prompt_price):
    """50 requests, each sent twice at once with one Idempotency-Key, against a balance for about 10: the
    loser of each pair gets 409 and the SDK retries it until it gets the winner's answer (or a refusal)."""
    probe = billed.new_key("dup-probe", 10**9)
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        body = http.request(**dialect_request("openai", billed.model, probe)).json()
    worst = cost(FLAT, num_prompt=body["usage"]["prompt_tokens"], num_cached=0, num_completion=4)
    granted = 10 * worst
    key = billed.new_key("dup-crowd", granted)

    async def burst() -> list[object]:
        client = openai.AsyncOpenAI(base_url=billed.url + "/v1", api_key=key, max_retries=8, timeout=300)

        async def one(i: int):
            try:
                return await client.chat.completions.create(
                    model=billed.model, messages=[{"role": "user", "content": "Hi!"}], max_tokens=4, temperature=0,
                    extra_headers={"Idempotency-Key": f"dup-{i // 2}"})
            except openai.APIStatusError as error:
                return error

        try:
            return await asyncio.gather(*(one(i) for i in range(100)))
        finally:
            await client.close()

    outcomes = asyncio.run(burst())
    ids_by_key: dict[int, set[str]] = {}
    usage_by_id: dict[str, dict] = {}
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, openai.APIStatusError):
            # refused (and not retried: 402 is final), or still in flight after every retry
            assert outcome.status_code in (402, 409), outcome
            if outcome.status_code == 402:
                assert outcome.body["message"].startswith("Insufficient Balance")
            continue
        ids_by_key.setdefault(i // 2, set()).add(outcome.id)
        usage_by_id[outcome.id] = outcome.usage.model_dump()
    assert all(len(ids) == 1 for ids in ids_by_key.values())  # a key's answers are one generation
    assert len(usage_by_id) >= 10
    charged = sum(charge_of(u, FLAT) for u in usage_by_id.values())
    rows = billed.usage("dup-crowd")
    assert sum(r["num_requests"] for r in rows) == len(usage_by_id)  # one charge per generation
    assert sum(r["cost_nanodollars"] for r in rows) == charged
    account = billed.account("dup-crowd")
    assert account["reserved_nanodollars"] == 0 and 0 <= account["balance_nanodollars"] == granted - charged
    billed.check_ledger("dup-crowd")


def test_cached_prompt_tokens_are_charged_at_the_cached_price(billed):
    granted = 10**9
    key = billed.new_key("cache-user", granted)
    client = openai.OpenAI(base_url=billed.url + "/v1", api_key=key, max_retries=0)
    system = {"role": "system", "content": "You answer in one word. " * 20}
    first = client.chat.completions.create(model=billed.model, messages=[system, {"role": "user", "content": "Hi"}],
                                           max_tokens=2)
    second = client.chat.completions.create(model=billed.model, max_tokens=2,
                                            messages=[system, {"role": "user", "content": "Hello there"}])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 100 < cached < second.usage.prompt_tokens
    charges = [charge_of(r.usage.model_dump()) for r in (first, second)]
    full_price = cost(FLAT, num_prompt=second.usage.prompt_tokens, num_cached=0,
                      num_completion=second.usage.completion_tokens)
    assert charges[1] == full_price - cached * (PRICE["input"] - PRICE["cached_input"]) // 1_000_000
    (row,) = billed.usage("cache-user")
    assert row["num_cached_tokens"] == cached + first.usage.prompt_tokens_details.cached_tokens
    assert row["cost_nanodollars"] == sum(charges)
    assert billed.account("cache-user")["balance_nanodollars"] == granted - sum(charges)
    client.close()


def test_every_segmind_answer_carries_x_remaining_credits(billed):
    granted = 10**9
    key = billed.new_key("seg-headers", granted)
    limited = billed.new_key("seg-limited", granted, rpm_limit=1)
    broke = billed.new_key("seg-broke")
    narrow = billed.new_key("seg-narrow", granted, allowed_models=["deepseek-r1-32b"])
    messages = [{"role": "user", "content": "Hi"}]
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        def seg(api_key: str | None, *, method: str = "POST", slug: str = "deepseek-reasoner", **kwargs):
            headers = {"x-api-key": api_key} if api_key else {}
            return http.request(method, f"/v1/{slug}", headers={**headers, **kwargs.pop("headers", {})}, **kwargs)

        ok = seg(key, json={"messages": messages, "max_tokens": 3})
        assert ok.status_code == 200
        after = granted - charge_of(ok.json()["usage"])
        assert ok.headers["x-remaining-credits"] == dollars(after)  # the balance after this call
        streamed = seg(key, json={"messages": messages, "max_tokens": 3, "stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        answers = {
            "stream": streamed,
            "no key": seg(None, json={"messages": messages}),
            "bad key": seg("ds-" + "x" * 43, json={"messages": messages}),
            "bearer only": http.post("/v1/deepseek-reasoner", headers={"Authorization": f"Bearer {key}"},
                                     json={"messages": messages}),
            "unknown slug": seg(key, slug="no-such-model", json={"messages": messages}),
            "wrong method": seg(key, method="GET"),
            "invalid": seg(key, json={"messages": messages, "max_tokens": -1}),
            "not json": seg(key, content=b"{", headers={"content-type": "application/json"}),
            "not json, bad key": seg("ds-" + "x" * 43, content=b"{", headers={"content-type": "application/json"}),
            "broke": seg(broke, json={"messages": messages}),
            "other model": seg(narrow, json={"messages": messages}),
        }
        idem = {"Idempotency-Key": "seg-h"}
        answers["idempotent"] = seg(key, json={"messages": messages, "max_tokens": 1}, headers=idem)
        answers["idempotency mismatch"] = seg(key, json={"messages": messages, "max_tokens": 2}, headers=idem)
        answers["one a minute"] = seg(limited, json={"messages": messages, "max_tokens": 1})
        answers["rate limited"] = seg(limited, json={"messages": messages, "max_tokens": 1})
    statuses = {name: r.status_code for name, r in answers.items()}
    assert statuses == {"stream": 200, "no key": 401, "bad key": 401, "bearer only": 401, "unknown slug": 404,
                        "wrong method": 405, "invalid": 400, "not json": 400, "not json, bad key": 401,
                        "broke": 406, "other model": 403,
                        "idempotent": 200, "idempotency mismatch": 422, "one a minute": 200, "rate limited": 429}
    assert answers["rate limited"].headers["retry-after"] and answers["rate limited"].headers[
        "x-ratelimit-remaining-requests"] == "0"
    for name, r in answers.items():
        assert "x-remaining-credits" in r.headers, name
        parse_dollars(r.headers["x-remaining-credits"])  # an exact decimal amount
        if r.status_code != 200:
            assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str), name
    assert answers["broke"].headers["x-remaining-credits"] == "0.00"
    assert answers["no key"].headers["x-remaining-credits"] == "0"  # nobody to ask about
    # a body FastAPI refuses before the route runs: the key is still looked up, its balance still told
    assert answers["not json"].headers["x-remaining-credits"] == answers["invalid"].headers["x-remaining-credits"]
    assert parse_dollars(answers["not json"].headers["x-remaining-credits"]) > 0
    # a wrong method: the key is read first, as for a POST, so the header is the balance and not a "0"
    assert answers["wrong method"].headers["x-remaining-credits"] == answers["invalid"].headers["x-remaining-credits"]


def test_an_expired_key_gets_401_in_every_dialect_and_is_never_echoed(billed):
    with billed.admin() as admin:
        r = admin.post("/admin/keys", json={"account": "expired", "expires_at": "2020-01-01T00:00:00Z"})
        assert r.status_code == 201 and r.json()["state"] == "expired"
        key = r.json()["key"]
    with httpx.Client(base_url=billed.url, timeout=60) as http:
        for dialect in DIALECTS:
            r = http.request(**dialect_request(dialect, billed.model, key))
            assert r.status_code == 401, (dialect, r.text)
            assert "expired" in r.text and key not in r.text and key[10:] not in r.text


class Counting(httpx.BaseTransport):
    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.num_sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.num_sent += 1
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def test_sdks_that_retry_do_not_retry_a_refusal_that_cannot_succeed(billed):
    """Workers AI answers an exhausted balance with 429 (code 3036), which the cloudflare SDK would retry;
    `x-should-retry: false` (the Stainless SDKs' header) stops it. The same for a request above a key's tokens
    per minute. A refused request changes nothing, however often it comes."""
    import cloudflare

    key = billed.new_key("no-retry")
    counting = Counting()
    cf = cloudflare.Cloudflare(api_token=key, base_url=billed.url + "/client/v4", max_retries=2,
                               http_client=httpx.Client(transport=counting, timeout=60))
    with pytest.raises(cloudflare.RateLimitError) as refused:
        cf.ai.run(f"@cf/{billed.model}", account_id="any", prompt="Hi!", max_tokens=4)
    assert refused.value.body["errors"][0]["code"] == 3036 and counting.num_sent == 1
    assert refused.value.response.headers["x-should-retry"] == "false"
    tight = billed.new_key("tight", 10**9, tpm_limit=50)
    counting = Counting()
    client = openai.OpenAI(base_url=billed.url + "/v1", api_key=tight, max_retries=2,
                           http_client=httpx.Client(transport=counting, timeout=60))
    with pytest.raises(openai.RateLimitError) as too_big:
        client.chat.completions.create(model=billed.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=100)
    assert "more than this key's limit of 50 tokens per minute" in too_big.value.message and counting.num_sent == 1
    assert billed.usage("no-retry") == billed.usage("tight") == []
    assert billed.account("tight")["reserved_nanodollars"] == 0


def test_the_model_listing_shows_the_price_requests_are_charged(billed):
    key = billed.new_key("lister", 10**9)
    client = openai.OpenAI(base_url=billed.url + "/v1", api_key=key, max_retries=0)
    (card,) = [m for m in client.models.list() if m.id == billed.model]
    assert card.model_extra["pricing"] == {"unit": "nanodollars_per_million_tokens", **PRICE}
    assert client.models.retrieve(billed.model).model_extra["pricing"]["output"] == PRICE["output"]
