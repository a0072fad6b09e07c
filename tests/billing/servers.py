"""Real `deepserve serve` processes with billing on, and what the tests do to them through HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from tests.server import RunningServer, start_server

ADMIN_KEY = "admin-test-key-7f3a"
OPERATOR_KEY = "sk-operator-key-for-tests"
# $1 per million prompt tokens (1000 nano-dollars a token), $0.25 cached, $2 per million completion tokens
PRICE = {"input": 1_000_000_000, "cached_input": 250_000_000, "output": 2_000_000_000}


def start_billing_server(db_url: str, *args: str) -> RunningServer:
    running = start_server(
        "--database-url", db_url, "--admin-key", ADMIN_KEY, "--parallel", "8", "--ctx-size", "512",
        "--max-queue", "256", *args, api_key=OPERATOR_KEY,
    )
    # After its ready line the server's stdout carries uvicorn's access log: append it to the log file (so a
    # test sees every line the server wrote), and keep the pipe drained.
    def drain() -> None:
        with open(running.log_path, "a", encoding="utf-8") as log:
            for line in running.process.stdout:
                log.write(line)
                log.flush()

    threading.Thread(target=drain, daemon=True).start()
    return running


@dataclass
class Billed:
    """A server with billing on, seen by its operator."""

    running: RunningServer
    db_url: str | None = None  # the server's billing database, for checks below the API (the ledger sum)

    @property
    def url(self) -> str:
        return self.running.root_url

    @property
    def model(self) -> str:
        return self.running.model

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def set_price(self, price: dict[str, int] | None = None) -> None:
        with self.admin() as admin:
            r = admin.put(f"/admin/prices/{self.model}", json=price or PRICE)
            assert r.status_code == 200, r.text

    def new_key(self, account: str, credits_nanodollars: int = 0, **key_fields: Any) -> str:
        with self.admin() as admin:
            r = admin.post("/admin/keys", json={"account": account, **key_fields})
            assert r.status_code == 201, r.text
            if credits_nanodollars:
                g = admin.post("/admin/credits", json={"account": account, "amount_nanodollars": credits_nanodollars})
                assert g.status_code == 200, g.text
            return r.json()["key"]

    def account(self, name: str) -> dict[str, Any]:
        with self.admin() as admin:
            r = admin.get(f"/admin/accounts/{name}")
            assert r.status_code == 200, r.text
            return r.json()

    def usage(self, account: str) -> list[dict[str, Any]]:
        with self.admin() as admin:
            r = admin.get("/admin/usage", params={"account": account})
            assert r.status_code == 200, r.text
            return r.json()["data"]

    def check_ledger(self, account: str) -> None:
        """The account's balance is the sum of its ledger rows, read from the database itself."""
        from deepserve.billing import accounts, db

        assert self.db_url is not None
        engine = db.create_db_engine(self.db_url, pool_size=1)
        try:
            info = accounts.get_account(engine, account)
            assert accounts.check_ledger(engine, info.id) == (info.balance, info.balance)
        finally:
            engine.dispose()

    def engine_counters(self, timeout_s: float = 60) -> dict[str, int]:
        """The engine's counters once it is idle (an earlier test's aborted stream may still be finishing)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while True:
                (stats,) = http.get("/health").json()["engines"]
                if (stats["num_running"] == 0 and stats["num_waiting"] == 0) or time.monotonic() > deadline:
                    return {k: stats[k] for k in ("num_requests_finished", "num_prompt_tokens",
                                                  "num_generated_tokens")}

    def wait_for_usage(self, account: str, num_requests: int, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Usage is settled when a stream closes on the server, which a client that hung up cannot watch:
        poll the admin API until the records are there (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.usage(account)
            if sum(r["num_requests"] for r in rows) >= num_requests or time.monotonic() > deadline:
                return rows


# ---- one request per dialect -------------------------------------------------------------------------
REFUSED_STATUS = {"openai": 402, "segmind": 406, "workers_ai": 429, "dataoorts": 402}


def dialect_request(dialect: str, model: str, key: str, *, max_tokens: int = 4, content: str = "Hi!",
                    **extra: Any) -> dict[str, Any]:
    """httpx.request kwargs for one chat request in `dialect`."""
    messages = [{"role": "user", "content": content}]
    bearer = {"Authorization": f"Bearer {key}"}
    if dialect == "openai":
        return {"method": "POST", "url": "/v1/chat/completions", "headers": bearer,
                "json": {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}}
    if dialect == "segmind":
        return {"method": "POST", "url": "/v1/deepseek-reasoner", "headers": {"x-api-key": key},
                "json": {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}}
    if dialect == "workers_ai":
        return {"method": "POST", "url": f"/client/v4/accounts/acct/ai/run/@cf/{model}", "headers": bearer,
                "json": {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}}
    if dialect == "dataoorts":
        return {"method": "POST", "url": "/api/v1", "headers": bearer,
                "json": {"model": model, "data": {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                                  **extra}}}
    raise ValueError(dialect)


def usage_of(dialect: str, body: dict[str, Any]) -> dict[str, int]:
    """The usage a 200 answer reports, whatever its dialect."""
    if dialect in ("openai", "segmind"):
        return body["usage"]
    return body["result"]["usage"]


def assert_refused(dialect: str, response: httpx.Response) -> None:
    """The dialect's own answer to an exhausted balance."""
    assert response.status_code == REFUSED_STATUS[dialect], response.text
    body = response.json()
    if dialect == "openai":
        assert body["error"]["code"] == "insufficient_balance"
        assert body["error"]["message"].startswith("Insufficient Balance")
    elif dialect == "segmind":
        assert set(body) == {"error"} and body["error"].startswith("Insufficient Balance")
    elif dialect == "workers_ai":
        assert body["success"] is False and body["errors"][0]["code"] == 3036
    else:
        assert body["success"] is False and body["result"] is None and body["errors"][0].startswith("Insufficient")
    assert "x-remaining-credits" in response.headers


async def fire(url: str, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send every request at once (one connection each)."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(client.request(**r) for r in requests))
