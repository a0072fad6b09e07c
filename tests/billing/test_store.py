"""The ledger in SQL, on SQLite and PostgreSQL: reserve -> settle keeps balance == sum(ledger), a reservation
never takes more than is available (also from many threads at once), crashed processes' reservations are
released, keys, rate limits and idempotency claims."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import uuid

import pytest
import sqlalchemy as sa

from deepserve.billing import accounts, db, idempotency, keys, ratelimit, reservations
from deepserve.billing.money import TokenPrices, cost, worst_case_cost
from deepserve.billing.reservations import Usage
from deepserve.billing.tables import Base, Instance, utcnow
from deepserve.errors import AuthenticationError, InsufficientBalanceError, RateLimitError
from tests.billing.conftest import count

PRICES = TokenPrices(input=1_000_000_000, cached_input=250_000_000, output=2_000_000_000)  # $1 / $0.25 / $2 per M
MODEL = ("m", "m-alias")


def reserve(engine, account_id: int, instance_id: str = "i1", *, num_prompt: int = 100, max_completion: int = 50,
            key_id: int | None = None, rpm: int | None = None, tpm: int | None = None, now_ms: int = 0):
    return reservations.reserve(
        engine, instance_id=instance_id, account_id=account_id, key_id=key_id, rpm_limit=rpm, tpm_limit=tpm,
        model_names=MODEL, catalog_prices=PRICES, num_prompt_tokens=num_prompt, max_completion_tokens=max_completion,
        now_ms=now_ms,
    )


def assert_invariants(engine, account_id: int) -> accounts.AccountInfo:
    balance, ledger_sum = accounts.check_ledger(engine, account_id)
    assert balance == ledger_sum
    info = accounts.get_account(engine, account_id)
    held = sum(amount for _, acc, amount in reservations.open_reservations(engine) if acc == account_id)
    assert info.reserved == held
    assert info.balance - info.reserved >= 0
    return info


def test_migrations_create_every_table_and_can_run_again(engine):
    assert db.upgrade(engine) == db.head_revision() == db.current_revision(engine)
    tables = set(sa.inspect(engine).get_table_names())
    assert set(Base.metadata.tables) | {"alembic_version"} <= tables


def test_costs_round_up_once_and_the_worst_case_bounds_every_usage():
    assert cost(PRICES, num_prompt=3, num_cached=1, num_completion=2) == 2000 + 250 + 4000
    assert cost(TokenPrices(1, 1, 1), num_prompt=1, num_cached=0, num_completion=0) == 1  # a fraction rounds up
    worst = worst_case_cost(PRICES, num_prompt=100, max_completion=50)
    assert worst == 100 * 1000 + 50 * 2000
    dear_cache = TokenPrices(input=10, cached_input=1000, output=0)
    assert cost(dear_cache, num_prompt=5, num_cached=5, num_completion=0) <= worst_case_cost(
        dear_cache, num_prompt=5, max_completion=0)


def test_grants_are_ledger_rows_and_a_deduction_never_takes_reserved_money(engine):
    account_id = accounts.ensure_account(engine, "alice")
    assert accounts.ensure_account(engine, "alice") == account_id
    accounts.grant(engine, account_id, 1_000_000)
    accounts.grant(engine, account_id, 500_000, kind="top_up")
    held = reserve(engine, account_id, num_prompt=1000, max_completion=0)  # holds 1,000,000
    with pytest.raises(ValueError, match="available balance"):
        accounts.grant(engine, account_id, -600_000, kind="adjust")
    info = accounts.grant(engine, account_id, -500_000, kind="adjust")
    assert (info.balance, info.reserved, info.available) == (1_000_000, 1_000_000, 0)
    assert assert_invariants(engine, account_id).balance == 1_000_000
    reservations.release(engine, held)
    assert accounts.get_account(engine, account_id).reserved == 0


def test_reserve_then_settle_charges_the_usage_and_writes_one_record_and_one_ledger_row(engine):
    account_id = accounts.ensure_account(engine, "bob")
    accounts.grant(engine, account_id, 10_000_000)
    r = reserve(engine, account_id, num_prompt=100, max_completion=50)
    assert r.amount == 200_000 and r.available_after == 10_000_000 - 200_000
    assert accounts.get_account(engine, account_id).reserved == 200_000
    available = reservations.settle(engine, r, Usage(num_prompt=100, num_cached=40, num_completion=7, num_reasoning=3),
                                    endpoint="/v1/chat/completions")
    expected = 60 * 1000 + 40 * 250 + 7 * 2000
    assert available == 10_000_000 - expected
    info = assert_invariants(engine, account_id)
    assert (info.balance, info.reserved) == (10_000_000 - expected, 0)
    with engine.connect() as conn:
        record = conn.execute(sa.text("SELECT * FROM usage_records")).one()
        charge = conn.execute(sa.text("SELECT amount, kind, usage_id FROM ledger WHERE kind = 'charge'")).one()
    assert (record.num_prompt_tokens, record.num_cached_tokens, record.num_completion_tokens,
            record.num_reasoning_tokens, record.cost, record.reserved) == (100, 40, 7, 3, expected, 200_000)
    assert record.model_id == "m" and record.day == utcnow().date().isoformat()
    assert tuple(charge) == (-expected, "charge", record.id)


def test_a_settle_never_charges_more_completion_than_was_reserved(engine):
    account_id = accounts.ensure_account(engine, "carol")
    accounts.grant(engine, account_id, 10_000_000)
    r = reserve(engine, account_id, num_prompt=10, max_completion=10)
    reservations.settle(engine, r, Usage(num_prompt=10, num_completion=10_000), endpoint="/x")
    assert assert_invariants(engine, account_id).balance == 10_000_000 - r.amount


def test_a_prompt_beyond_its_bound_is_charged_from_the_free_balance_never_below_zero(engine):
    """An upstream's template made the prompt longer than the bound reserved for: the real count is charged
    while the account can pay it; past that, all it has, and never a negative balance."""
    account_id = accounts.ensure_account(engine, "dave")
    accounts.grant(engine, account_id, 2_000_000)
    r = reserve(engine, account_id, num_prompt=100, max_completion=10)  # 120,000 reserved
    reservations.settle(engine, r, Usage(num_prompt=1_100, num_completion=2), endpoint="/x")
    assert assert_invariants(engine, account_id).balance == 2_000_000 - (1_100 * 1000 + 2 * 2000)
    r = reserve(engine, account_id, num_prompt=100, max_completion=10)
    reservations.settle(engine, r, Usage(num_prompt=5_000, num_completion=2), endpoint="/x")
    info = assert_invariants(engine, account_id)
    assert (info.balance, info.reserved) == (0, 0)


def test_an_insufficient_balance_is_refused_and_changes_nothing(engine):
    account_id = accounts.ensure_account(engine, "dave")
    accounts.grant(engine, account_id, 199_999)
    with pytest.raises(InsufficientBalanceError) as caught:
        reserve(engine, account_id, num_prompt=100, max_completion=50)  # needs 200,000
    assert caught.value.message.startswith("Insufficient Balance")
    assert caught.value.status_code == 402 and caught.value.code == "insufficient_balance"
    assert caught.value.available_nanodollars == 199_999
    assert count(engine, "reservations") == 0 and accounts.get_account(engine, account_id).reserved == 0


def test_a_free_model_needs_no_balance_and_is_still_recorded(engine):
    account_id = accounts.ensure_account(engine, "erin")
    r = reservations.reserve(
        engine, instance_id="i1", account_id=account_id, key_id=None, rpm_limit=None, tpm_limit=None,
        model_names=("free",), catalog_prices=None, num_prompt_tokens=10, max_completion_tokens=10, now_ms=0)
    assert r.amount == 0
    reservations.settle(engine, r, Usage(num_prompt=10, num_completion=10), endpoint="/x")
    assert count(engine, "usage_records") == 1 and count(engine, "ledger") == 0


def test_operator_prices_override_the_catalog_by_served_id_first(engine):
    account_id = accounts.ensure_account(engine, "fay")
    accounts.grant(engine, account_id, 10**12)
    assert reserve(engine, account_id, num_prompt=1000, max_completion=0).prices == PRICES
    accounts.set_price(engine, "m-alias", TokenPrices(7, 7, 7))
    assert reserve(engine, account_id, num_prompt=1000, max_completion=0).prices == TokenPrices(7, 7, 7)
    accounts.set_price(engine, "m", TokenPrices(3, 2, 1))
    assert reserve(engine, account_id, num_prompt=1000, max_completion=0).prices == TokenPrices(3, 2, 1)
    assert accounts.delete_price(engine, "m") and accounts.delete_price(engine, "m-alias")
    assert not accounts.delete_price(engine, "m")


def test_concurrent_reservations_from_many_threads_never_overspend(engine):
    account_id = accounts.ensure_account(engine, "gus")
    amount = worst_case_cost(PRICES, num_prompt=100, max_completion=50)
    accounts.grant(engine, account_id, amount * 10 + amount // 2)  # room for exactly 10
    results: list[object] = []
    start = threading.Barrier(40)

    def one() -> None:
        start.wait()
        try:
            results.append(reserve(engine, account_id))
        except InsufficientBalanceError as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [r for r in results if isinstance(r, reservations.Reservation)]
    assert len(held) == 10 and len(results) == 40
    assert accounts.get_account(engine, account_id).reserved == 10 * amount
    for i, r in enumerate(held):
        reservations.settle(engine, r, Usage(num_prompt=100, num_completion=i), endpoint="/x")
    info = assert_invariants(engine, account_id)
    spent = sum(cost(PRICES, num_prompt=100, num_cached=0, num_completion=i) for i in range(10))
    assert info.balance == amount * 10 + amount // 2 - spent and info.reserved == 0


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_reservations_of_dead_processes_are_released_and_live_ones_kept(engine):
    account_id = accounts.ensure_account(engine, "hal")
    accounts.grant(engine, account_id, 10_000_000)
    machine = reservations.machine_id()
    crashed, remote_stale, live, me = (uuid.uuid4().hex for _ in range(4))
    reservations.register_instance(engine, crashed, machine, _dead_pid())
    reservations.register_instance(engine, remote_stale, "elsewhere", 1)
    reservations.register_instance(engine, live, machine, 1)  # pid 1 is alive here
    reservations.register_instance(engine, me, machine, 2)
    with engine.begin() as conn:  # the remote process stopped beating two minutes ago
        conn.execute(sa.update(Instance.__table__).where(Instance.__table__.c.id == remote_stale)
                     .values(heartbeat_at=utcnow() - dt.timedelta(minutes=2)))
    for instance in (crashed, remote_stale, live):
        reserve(engine, account_id, instance)
    claim = idempotency.claim(engine, "scope", "k", "fp", crashed)
    assert claim == "claimed"
    assert reservations.release_dead(engine, me, machine) == 2
    remaining = reservations.open_reservations(engine)
    assert len(remaining) == 1
    info = assert_invariants(engine, account_id)
    assert info.reserved == remaining[0][2] and info.balance == 10_000_000
    assert idempotency.claim(engine, "scope", "k", "fp", me) == "claimed"  # the dead claim is gone
    assert reservations.release_dead(engine, me, machine) == 0


def test_a_settle_after_its_reservation_was_released_charges_only_what_is_free(engine):
    account_id = accounts.ensure_account(engine, "ivy")
    accounts.grant(engine, account_id, 300_000)
    r = reserve(engine, account_id)  # 200,000
    reservations.unregister_instance(engine, "i1")  # as if another process took "i1" for dead
    other = reserve(engine, account_id, "i2", num_prompt=250, max_completion=0)  # 250,000 of the 300,000
    reservations.settle(engine, r, Usage(num_prompt=100, num_completion=50), endpoint="/x")
    info = assert_invariants(engine, account_id)
    assert info.balance == 300_000 - 50_000 and info.reserved == other.amount


def test_keys_are_stored_as_hashes_and_revoked_or_expired_keys_are_refused(engine):
    account_id = accounts.ensure_account(engine, "jo")
    key, info = keys.create_key(engine, account_id, name="ci", allowed_models=["m"], rpm_limit=5)
    assert key.startswith("ds-") and len(key) > 40 and info.prefix == key[:10]
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT key_hash FROM api_keys")).scalar_one()
    assert stored == keys.hash_key(key) and key not in stored
    principal = keys.lookup(engine, key)
    assert (principal.account_id, principal.key_id, principal.allowed_models, principal.rpm_limit) == (
        account_id, info.id, ("m",), 5)
    assert principal.is_metered and key not in principal.key_name
    with pytest.raises(AuthenticationError) as wrong:
        keys.lookup(engine, key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert key not in wrong.value.message
    keys.revoke_key(engine, info.id)
    with pytest.raises(AuthenticationError, match="revoked") as revoked:
        keys.lookup(engine, key)
    assert key not in revoked.value.message
    old, _ = keys.create_key(engine, account_id, expires_at=utcnow() - dt.timedelta(seconds=1))
    with pytest.raises(AuthenticationError, match="expired"):
        keys.lookup(engine, old)
    assert [k.state for k in keys.list_keys(engine)] == ["revoked", "expired"]
    assert keys.find_key(engine, info.prefix).id == info.id


def test_rate_limits_take_requests_and_tokens_and_refill_over_the_minute(engine):
    account_id = accounts.ensure_account(engine, "kim")
    accounts.grant(engine, account_id, 10**12)
    _, info = keys.create_key(engine, account_id, rpm_limit=2, tpm_limit=1000)
    go = dict(key_id=info.id, rpm=2, tpm=1000, num_prompt=100, max_completion=100)
    first = reserve(engine, account_id, now_ms=0, **go)
    assert first.rate_headers["x-ratelimit-remaining-requests"] == "1"
    assert first.rate_headers["x-ratelimit-remaining-tokens"] == "800"
    reserve(engine, account_id, now_ms=10, **go)
    with pytest.raises(RateLimitError) as limited:
        reserve(engine, account_id, now_ms=20, **go)
    error = limited.value
    assert error.status_code == 429 and "2 requests per minute" in error.message
    assert error.headers["Retry-After"] == "30"  # one request refills in 60 s / 2
    assert error.headers["x-ratelimit-limit-requests"] == "2" and error.headers["x-ratelimit-remaining-requests"] == "0"
    assert count(engine, "reservations") == 2  # the refused one held nothing
    # 30 s later one request is back; tokens: 600 left + 500 refilled, capped at 1000
    third = reserve(engine, account_id, now_ms=30_020, **go)
    assert third.rate_headers["x-ratelimit-remaining-requests"] == "0"
    assert third.rate_headers["x-ratelimit-remaining-tokens"] == str(1000 - 200)
    # unused tokens go back at settle
    reservations.settle(engine, third, Usage(num_prompt=100, num_completion=0), endpoint="/x")
    with engine.connect() as conn:
        level = conn.execute(sa.text("SELECT token_level FROM rate_buckets")).scalar_one()
    assert level == 900 * ratelimit.UNITS
    with pytest.raises(RateLimitError, match="more than this key's limit"):
        reserve(engine, account_id, now_ms=60_000, key_id=info.id, rpm=None, tpm=1000, num_prompt=900,
                max_completion=200)


def test_idempotency_claims_one_winner_then_replays_the_stored_answer(engine):
    assert idempotency.claim(engine, "s", "k", "fp", "i1") == "claimed"
    assert idempotency.claim(engine, "s", "k", "fp", "i2") == "in_flight"
    assert idempotency.claim(engine, "s", "k", "other", "i2") == "mismatch"
    idempotency.finish(engine, "s", "k", idempotency.Stored(200, [("content-type", "application/json")], b"{}"))
    stored = idempotency.claim(engine, "s", "k", "fp", "i2")
    assert stored == idempotency.Stored(200, [("content-type", "application/json")], b"{}")
    assert idempotency.claim(engine, "other-caller", "k", "fp", "i2") == "claimed"
    idempotency.abandon(engine, "other-caller", "k")
    assert idempotency.claim(engine, "other-caller", "k", "fp", "i2") == "claimed"


def test_a_refusal_for_the_balance_takes_nothing_from_the_rate_limit(engine):
    account_id = accounts.ensure_account(engine, "lou")
    _, info = keys.create_key(engine, account_id, rpm_limit=1, tpm_limit=1000)
    go = dict(key_id=info.id, rpm=1, tpm=1000, num_prompt=100, max_completion=100, now_ms=0)
    with pytest.raises(InsufficientBalanceError) as refused:
        reserve(engine, account_id, **go)
    assert refused.value.headers["x-should-retry"] == "false"  # SDKs must not retry it: nothing will change
    assert count(engine, "rate_buckets") == 0 and count(engine, "reservations") == 0
    accounts.grant(engine, account_id, 10**9)
    held = reserve(engine, account_id, **go)  # the one request of this minute is still there
    assert held.rate_headers["x-ratelimit-remaining-requests"] == "0"
    assert held.rate_headers["x-ratelimit-remaining-tokens"] == "800"


def test_sqlite_runs_in_wal_mode_and_the_database_url_comes_from_the_environment(tmp_path, monkeypatch):
    from deepserve.config import Settings

    sqlite = db.create_db_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    with sqlite.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: a settle survives a power cut
    sqlite.dispose()
    monkeypatch.delenv("DEEPSERVE_DATABASE_URL", raising=False)
    monkeypatch.setenv("DEEPSERVE_DATA_DIR", str(tmp_path))
    assert Settings().resolved_database_url == f"sqlite:///{tmp_path / 'deepserve.db'}"
    monkeypatch.setenv("DEEPSERVE_DATABASE_URL", "postgresql+psycopg://ds:pw@db.internal:5432/billing")
    assert Settings().resolved_database_url == "postgresql+psycopg://ds:pw@db.internal:5432/billing"
    assert db.describe(Settings().resolved_database_url) == "postgresql+psycopg://ds:***@db.internal:5432/billing"
    assert db.create_db_engine("postgresql://ds:pw@db.internal/billing").dialect.driver == "psycopg"
