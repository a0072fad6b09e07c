"""Two deepserve replicas on one PostgreSQL share rate limits and Idempotency-Key answers (balances: see
test_processes.py), as deploy/README.md promises for replicas behind a load balancer."""

from __future__ import annotations

import httpx

from tests.billing.conftest import PG_URL, needs_postgres, reset_postgres
from tests.billing.servers import Billed, start_billing_server


def chat(model: str, content: str = "Hi!") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}


@needs_postgres
def test_two_replicas_share_rate_limits_and_idempotent_answers():
    assert PG_URL
    reset_postgres(PG_URL)
    a, b = (Billed(start_billing_server(PG_URL)) for _ in range(2))
    try:
        a.set_price()
        limited = a.new_key("limited", 10**9, rpm_limit=2)
        once = a.new_key("once", 10**9)
        with httpx.Client(base_url=a.url, timeout=60) as on_a, httpx.Client(base_url=b.url, timeout=60) as on_b:
            auth = {"Authorization": f"Bearer {limited}"}
            assert on_a.post("/v1/chat/completions", json=chat(a.model), headers=auth).status_code == 200
            assert on_b.post("/v1/chat/completions", json=chat(a.model), headers=auth).status_code == 200
            third = on_a.post("/v1/chat/completions", json=chat(a.model), headers=auth)
            assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
            assert third.headers["x-ratelimit-remaining-requests"] == "0"

            auth = {"Authorization": f"Bearer {once}", "Idempotency-Key": "order-7"}
            first = on_a.post("/v1/chat/completions", json=chat(a.model), headers=auth)
            again = on_b.post("/v1/chat/completions", json=chat(a.model), headers=auth)
            assert first.status_code == again.status_code == 200
            assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
            other = on_b.post("/v1/chat/completions", json=chat(a.model, "Something else"), headers=auth)
            assert other.status_code == 422
        rows = b.usage("once")
        assert sum(r["num_requests"] for r in rows) == 1  # answered twice, charged once
        assert b.account("once")["balance_nanodollars"] == 10**9 - rows[0]["cost_nanodollars"]
        assert sum(r["num_requests"] for r in a.usage("limited")) == 2
    finally:
        a.running.stop()
        b.running.stop()
