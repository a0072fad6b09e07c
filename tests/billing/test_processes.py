"""Billing across server processes: a server killed with SIGKILL mid-stream leaves no money locked once it is
restarted, two servers on one PostgreSQL never overspend one balance together, and no key ever reaches a log."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from deepserve.billing import accounts, db, reservations
from tests.billing.conftest import PG_URL, needs_postgres, reset_postgres
from tests.billing.servers import (
    ADMIN_KEY,
    OPERATOR_KEY,
    REFUSED_STATUS,
    Billed,
    assert_refused,
    dialect_request,
    fire,
    start_billing_server,
    usage_of,
)

DIALECTS = list(REFUSED_STATUS)


def test_a_server_killed_mid_stream_leaves_no_open_reservation_after_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    first = Billed(start_billing_server(url))
    try:
        first.set_price()
        key = first.new_key("victim", 10**9)
        done_key = first.new_key("settled", 10**9)
        with httpx.Client(base_url=first.url, timeout=60) as http:
            ok = http.request(**dialect_request("openai", first.model, done_key))  # completed before the crash
            assert ok.status_code == 200
            body = {"model": first.model, "messages": [{"role": "user", "content": "Write a long essay."}],
                    "max_tokens": 400, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")  # generating: its reservation is open
                engine = db.create_db_engine(url)
                victim = accounts.get_account(engine, "victim")
                assert victim.reserved > 0 and len(reservations.open_reservations(engine)) == 1
                # A short stream ends while the long one runs: once the client has seen its end, its charge
                # is committed, even if the server dies the next instant.
                short = {**body, "max_tokens": 3, "ignore_eos": True}
                with http.stream("POST", "/v1/chat/completions", json=short,
                                 headers={"Authorization": f"Bearer {done_key}"}) as done_stream:
                    for line in done_stream.iter_lines():
                        if '"finish_reason":"length"' in line:
                            break  # the end of the answer, before [DONE]
                    else:
                        raise AssertionError("the short stream never finished")
                    first.running.process.send_signal(signal.SIGKILL)
                first.running.process.wait()
    finally:
        first.running.stop()
    assert accounts.get_account(engine, "victim").reserved > 0  # still locked: nobody released it
    second = Billed(start_billing_server(url))
    try:
        assert reservations.open_reservations(engine) == []  # released at start, before the ready line
        victim = accounts.get_account(engine, "victim")
        assert (victim.balance, victim.reserved) == (10**9, 0)  # nothing settled, nothing lost, nothing locked
        assert accounts.check_ledger(engine, victim.id) == (10**9, 10**9)
        settled = accounts.get_account(engine, "settled")
        (kept,) = second.usage("settled")
        assert kept["num_requests"] == 2 and kept["num_completion_tokens"] == ok.json()["usage"]["completion_tokens"] + 3
        assert settled.balance == 10**9 - kept["cost_nanodollars"] < 10**9  # both completed requests kept
        assert accounts.check_ledger(engine, settled.id) == (settled.balance, settled.balance)
        with httpx.Client(base_url=second.url, timeout=60) as http:
            assert http.request(**dialect_request("openai", second.model, key)).status_code == 200
    finally:
        second.running.stop()
        engine.dispose()


def test_no_key_reaches_the_server_log(tmp_path):
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    running = start_billing_server(url, "--log-level", "debug")
    server = Billed(running)
    secrets_seen: list[str] = [ADMIN_KEY, OPERATOR_KEY]
    try:
        server.set_price()
        key = server.new_key("logged", 10**9, rpm_limit=1000)
        revoked = server.new_key("gone", 10**9)
        broke = server.new_key("broke")
        wrong = "ds-" + "x" * 43
        secrets_seen += [key, revoked, broke, wrong]
        with server.admin() as admin:
            admin.delete(f"/admin/keys/{revoked[:10]}")
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for dialect in DIALECTS:
                for k in (key, revoked, broke, wrong):
                    http.request(**dialect_request(dialect, server.model, k, stream=dialect != "dataoorts"))
            http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "a"},
                      json={"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            http.get("/user/balance", headers={"Authorization": f"Bearer {key}"})
            http.get("/admin/accounts", headers={"Authorization": "Bearer not-the-admin-key"})
    finally:
        running.stop()
    log = running.log()
    assert "deepserve.billing" in log and "POST /v1/chat/completions" in log  # the log did capture the run
    for secret in secrets_seen:
        assert secret not in log
        assert secret[10:30] not in log  # not even the part after the public prefix


@needs_postgres
def test_two_servers_on_one_postgresql_never_overspend_one_balance():
    assert PG_URL
    reset_postgres(PG_URL)
    servers = [Billed(start_billing_server(PG_URL)) for _ in range(2)]
    try:
        servers[0].set_price({"input": 1_000_000_000, "cached_input": 1_000_000_000, "output": 2_000_000_000})
        probe = servers[0].new_key("probe", 10**9)
        with httpx.Client(base_url=servers[1].url, timeout=60) as http:
            r = http.request(**dialect_request("openai", servers[1].model, probe)).json()
        worst = (r["usage"]["prompt_tokens"] + 8) * 1000 + 4 * 2000  # a little above any dialect's prompt
        granted = 20 * worst
        key = servers[0].new_key("shared", granted)
        requests = [dialect_request(DIALECTS[i % 4], servers[0].model, key) for i in range(200)]

        async def both() -> list[list[httpx.Response]]:
            return await asyncio.gather(fire(servers[0].url, requests[::2]), fire(servers[1].url, requests[1::2]))

        halves = asyncio.run(both())
        served = num_completion = 0
        for offset, responses in enumerate(halves):
            for j, response in enumerate(responses):
                dialect = DIALECTS[(2 * j + offset) % 4]
                if response.status_code == 200:
                    served += 1
                    num_completion += usage_of(dialect, response.json())["completion_tokens"]
                else:
                    assert_refused(dialect, response)
        assert served >= 15
        account = servers[1].account("shared")
        assert account["reserved_nanodollars"] == 0 and account["balance_nanodollars"] >= 0
        rows = servers[0].usage("shared")
        assert sum(r["num_requests"] for r in rows) == served
        assert sum(r["num_completion_tokens"] for r in rows) == num_completion
        assert account["balance_nanodollars"] == granted - sum(r["cost_nanodollars"] for r in rows)
        engine = db.create_db_engine(PG_URL)
        assert accounts.check_ledger(engine, account["id"]) == (account["balance_nanodollars"],) * 2
        engine.dispose()

        # One key's rate limit holds across both servers: 2 requests a minute, 8 sent at once, half to each.
        limited = servers[0].new_key("limited-shared", 10**9, rpm_limit=2)
        burst = [dialect_request("openai", servers[0].model, limited, max_tokens=1) for _ in range(8)]

        async def both_limited() -> list[list[httpx.Response]]:
            return await asyncio.gather(fire(servers[0].url, burst[:4]), fire(servers[1].url, burst[4:]))

        started = time.monotonic()
        answers = [r for half in asyncio.run(both_limited()) for r in half]
        refills = int((time.monotonic() - started) * 2 / 60)  # the bucket refills 2 a minute
        served = [r for r in answers if r.status_code == 200]
        limited_answers = [r for r in answers if r.status_code != 200]
        assert 2 <= len(served) <= 2 + refills
        for r in limited_answers:
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
            assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-requests"] == "2"
        assert sum(r["num_requests"] for r in servers[1].usage("limited-shared")) == len(served)
    finally:
        for server in servers:
            server.running.stop()
