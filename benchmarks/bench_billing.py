"""What metering costs: throughput of 8 concurrent streams with billing on (a database key with credits and a
price, so every request is authenticated, reserved and settled in the database) against `--no-auth` (no key,
no database work), in one run, rounds interleaved, on the bundled model.

    .venv/bin/python benchmarks/bench_billing.py                 # SQLite (the default database)
    .venv/bin/python benchmarks/bench_billing.py --database-url postgresql+psycopg://...   # PostgreSQL
    .venv/bin/python benchmarks/bench_billing.py --rounds 5 --max-tokens 64 --streams 8 --requests 24

Each round sends `--requests` streaming chat requests, `--streams` at a time, to one server and reports
generated tokens per second of wall time and requests per second. All traffic stays on 127.0.0.1.

`--db-only` measures the database work of one metered request alone (key lookup, reserve, settle), one at a
time and from 8 threads at once: what billing costs, apart from the engine and HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.billing.servers import ADMIN_KEY, start_billing_server  # noqa: E402
from tests.server import start_server  # noqa: E402

PROMPT = "Write a long story about a robot who learns to paint."


async def one_stream(client: httpx.AsyncClient, body: dict, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    num_tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    num_tokens = chunk["usage"]["completion_tokens"]
    return num_tokens


async def one_round(url: str, key: str | None, model: str, args) -> tuple[float, float]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": args.max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7}
    semaphore = asyncio.Semaphore(args.streams)

    async def limited(client: httpx.AsyncClient) -> int:
        async with semaphore:
            return await one_stream(client, body, key)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        tokens = await asyncio.gather(*(limited(client) for _ in range(args.requests)))
        wall_s = time.perf_counter() - start
    assert all(t == args.max_tokens for t in tokens), tokens
    return sum(tokens) / wall_s, args.requests / wall_s


def db_only(db_url: str, num_requests: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from deepserve.billing import accounts, db, keys, reservations
    from deepserve.billing.money import TokenPrices
    from deepserve.billing.reservations import Usage

    engine = db.create_db_engine(db_url)
    db.upgrade(engine)
    account_id = accounts.ensure_account(engine, f"bench-{time.time_ns()}")
    accounts.grant(engine, account_id, 10**15)
    key, _ = keys.create_key(engine, account_id)
    prices = TokenPrices(140_000_000, 14_000_000, 280_000_000)

    def one(_: int) -> None:
        principal = keys.lookup(engine, key)
        held = reservations.reserve(
            engine, instance_id="bench", account_id=principal.account_id, key_id=principal.key_id, rpm_limit=None,
            tpm_limit=None, model_names=("m",), catalog_prices=prices, num_prompt_tokens=30,
            max_completion_tokens=32, now_ms=0)
        reservations.settle(engine, held, Usage(num_prompt=30, num_cached=10, num_completion=32), endpoint="/bench")

    for threads in (1, 8):
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(pool.map(one, range(num_requests)))
            wall_s = time.perf_counter() - start
        print(f"{'PostgreSQL' if db_url.startswith('postgresql') else 'SQLite'}, {threads} thread(s): "
              f"{num_requests / wall_s:7.0f} metered requests/s (lookup + reserve + settle), "
              f"{1000 * wall_s / num_requests * threads:.2f} ms each", flush=True)
    balance, ledger = accounts.check_ledger(engine, account_id)
    assert balance == ledger
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24, help="requests per round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--database-url", default=None, help="billing database (default: a fresh SQLite file)")
    parser.add_argument("--db-only", action="store_true", help="only the database work of metered requests")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-billing-"))
    db_url = args.database_url or f"sqlite:///{folder / 'billing.db'}"
    if args.db_only:
        db_only(db_url, args.requests * 25)
        return
    results: dict[str, list[tuple[float, float]]] = {"billing on": [], "--no-auth": []}
    key = None
    for round_index in range(args.rounds):
        for mode in results:
            if mode == "billing on":
                running = start_billing_server(db_url, "--parallel", str(args.streams), "--ctx-size", "1024")
                admin = httpx.Client(base_url=running.root_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                if key is None:
                    admin.put(f"/admin/prices/{running.model}",
                              json={"input": 140_000_000, "cached_input": 14_000_000, "output": 280_000_000})
                    key = admin.post("/admin/keys", json={"account": "bench"}).json()["key"]
                    admin.post("/admin/credits", json={"account": "bench", "amount_usd": "1000"})
                admin.close()
                use_key = key
            else:
                running = start_server("--no-auth", "--parallel", str(args.streams), "--ctx-size", "1024",
                                       api_key=None)
                use_key = None
            try:
                asyncio.run(one_round(running.root_url, use_key, running.model,
                                      argparse.Namespace(**{**vars(args), "requests": args.streams})))  # warm-up
                results[mode].append(asyncio.run(one_round(running.root_url, use_key, running.model, args)))
            finally:
                running.stop()
            tok_s, req_s = results[mode][-1]
            print(f"round {round_index + 1} {mode:>10}: {tok_s:7.1f} tok/s  {req_s:5.2f} req/s", flush=True)
    print(f"\n{args.streams} concurrent streams, {args.requests} requests x {args.max_tokens} tokens per round, "
          f"median of {args.rounds} rounds ({'PostgreSQL' if db_url.startswith('postgresql') else 'SQLite'}):")
    medians = {mode: statistics.median(t for t, _ in runs) for mode, runs in results.items()}
    for mode, runs in results.items():
        print(f"  {mode:>10}: {medians[mode]:7.1f} tok/s  {statistics.median(r for _, r in runs):5.2f} req/s")
    print(f"  billing on / --no-auth: {medians['billing on'] / medians['--no-auth']:.3f}")


if __name__ == "__main__":
    main()
