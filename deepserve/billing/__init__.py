"""Keys, credits and metering: the ledger behind every request.

    tables.py      the SQLAlchemy models; migrations/ the Alembic scripts that create them
    db.py          engine (SQLite WAL by default, PostgreSQL by URL) and programmatic migrations
    money.py       nano-dollars <-> decimal dollars, costs from token counts and prices
    keys.py        key making/hashing and the database key store behind `authenticate()`
    accounts.py    operator operations: accounts, credits, balances, prices
    reservations.py the hot path in SQL: reserve (one conditional UPDATE) -> settle, crash release
    ratelimit.py   per-key requests/tokens per minute, token buckets in the database
    meter.py       the async face used by deepserve.serving: reserve, wrap the streams, settle once
    idempotency.py `Idempotency-Key`: store the first answer, replay it, 409 while in flight
    headers.py     x-remaining-credits and x-ratelimit-* on every response
    usage.py       usage reports (by key, model and day)
    service.py     what create_app holds: database + meter + key store, started and stopped by the lifespan

Every dialect route reaches billing through one function, `deepserve.serving.metered_generate()`.
"""
