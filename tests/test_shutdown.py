"""Graceful shutdown of a real `deepserve serve` (deepserve/shutdown.py): SIGTERM during a stream lets it
finish, refuses new requests in their dialect, settles billing and exits 0; past --shutdown-timeout what
is left is cut and charged for what it computed."""

from __future__ import annotations

import json
import signal
import time

import httpx
import sqlalchemy as sa

from deepserve.billing import accounts, db, money, reservations
from deepserve.billing.money import TokenPrices
from tests.billing.servers import PRICE, Billed, dialect_request, start_billing_server
from tests.server import start_server

MAX_TOKENS = 160  # the drain checks take well under a second; on a loaded 2-core box tokens crawl


def wait_until_draining(url: str, timeout_s: float = 30) -> httpx.Response:
    """The signal is handled asynchronously: poll readiness (bounded) until the server says it is draining."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(url + "/v1/health/ready", timeout=10)
        if r.status_code == 503:
            return r
        assert time.monotonic() < deadline, "the server never started draining"
        time.sleep(0.05)


def open_stream(http: httpx.Client, model: str, key: str):
    body = {"model": model, "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def usage_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, num_prompt_tokens, num_completion_tokens, cost FROM usage_records"))
        return [dict(row._mapping) for row in rows]


def billed_server(tmp_path, *args: str) -> tuple[Billed, str, str]:
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    server = Billed(start_billing_server(url, *args))
    server.set_price()
    return server, url, server.new_key("streamer", 10**9)


def test_sigterm_lets_a_running_stream_finish_refuses_new_requests_and_settles_billing(tmp_path):
    server, url, key = billed_server(tmp_path, "--shutdown-timeout", "600")
    engine = db.create_db_engine(url)
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http, open_stream(http, server.model, key) as stream:
            assert stream.status_code == 200
            events = (line for line in stream.iter_lines() if line.startswith("data: "))
            chunks = [next(events), next(events)]  # the role chunk, then the first token: generating
            assert len(reservations.open_reservations(engine)) == 1
            server.running.process.send_signal(signal.SIGTERM)

            ready = wait_until_draining(server.url)
            assert ready.json()["message"] == "Service is shutting down."
            with httpx.Client(base_url=server.url, timeout=30) as late:  # a new connection, during the drain
                refused = late.request(**dialect_request("openai", server.model, key))
                assert refused.status_code == 503
                error = refused.json()["error"]  # OpenAI's envelope
                assert (error["type"], error["code"]) == ("service_unavailable", "service_unavailable")
                assert error["message"].startswith("The server is shutting down")
                assert refused.headers["connection"] == "close"
                cf = late.request(**dialect_request("workers_ai", server.model, key))
                assert cf.status_code == 503 and cf.json()["success"] is False  # Cloudflare's envelope
                seg = late.request(**dialect_request("segmind", server.model, key))
                assert seg.status_code == 503 and set(seg.json()) == {"error"}  # Segmind's
                assert late.get("/v1/health/live").status_code == 200
                page = late.get("/metrics")
                assert page.status_code == 200 and "deepserve_draining 1.0" in page.text

            chunks += list(events)  # the stream goes on to its end
        assert chunks[-1] == "data: [DONE]"
        parsed = [json.loads(c[6:]) for c in chunks[:-1]]
        finishes = [ch["finish_reason"] for p in parsed for ch in p["choices"] if ch.get("finish_reason")]
        assert finishes == ["length"]
        usage = parsed[-1]["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS

        assert server.running.process.wait(timeout=120) == 0
        # billing: settled with what the stream delivered, nothing left reserved, the instance signed off
        assert reservations.open_reservations(engine) == []
        (row,) = usage_rows(engine)
        assert (row["status"], row["num_prompt_tokens"], row["num_completion_tokens"]) == \
            ("ok", usage["prompt_tokens"], MAX_TOKENS)
        account = accounts.get_account(engine, "streamer")
        assert (account.balance, account.reserved) == (10**9 - row["cost"], 0)
        assert row["cost"] == money.cost(TokenPrices(**PRICE), num_prompt=usage["prompt_tokens"],
                                         num_cached=usage["prompt_tokens_details"]["cached_tokens"],
                                         num_completion=MAX_TOKENS)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM instances")).scalar_one() == 0
        assert "shutting down: refusing new requests" in server.running.log()
    finally:
        server.running.stop()
        engine.dispose()


def test_past_the_shutdown_timeout_a_stream_is_cut_and_charged_for_what_it_computed(tmp_path):
    server, url, key = billed_server(tmp_path, "--shutdown-timeout", "0")
    engine = db.create_db_engine(url)
    try:
        lines: list[str] = []
        with httpx.Client(base_url=server.url, timeout=300) as http, open_stream(http, server.model, key) as stream:
            events = (line for line in stream.iter_lines() if line.startswith("data: "))
            lines += [next(events), next(events)]
            server.running.process.send_signal(signal.SIGTERM)
            try:
                lines += list(events)
            except httpx.RemoteProtocolError:  # the connection closed mid-body
                pass
        assert "data: [DONE]" not in lines  # never presented as a complete answer
        assert not any('"finish_reason":"length"' in line for line in lines)
        assert server.running.process.wait(timeout=120) == 0
        assert reservations.open_reservations(engine) == []
        (row,) = usage_rows(engine)
        assert row["status"] == "aborted" and 1 <= row["num_completion_tokens"] < MAX_TOKENS
        account = accounts.get_account(engine, "streamer")
        assert (account.balance, account.reserved) == (10**9 - row["cost"], 0)
        assert "cut by the shutdown timeout" in server.running.log()
    finally:
        server.running.stop()
        engine.dispose()


def test_sigint_on_an_idle_server_exits_0():
    running = start_server("--parallel", "1", "--ctx-size", "256")
    try:
        assert httpx.get(running.root_url + "/v1/health/ready", timeout=30).status_code == 200
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=60) == 0
        assert "drained: stopping the server" in running.log()
    finally:
        running.stop()
