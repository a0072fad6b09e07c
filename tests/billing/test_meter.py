"""The meter between the engine's streams and the ledger, on a real billing database (SQLite, and PostgreSQL
when configured) with scripted engine streams: what a request is charged when it ends, is cut off or fails,
and that the charge is committed before the last delta reaches the route (a crash after the client saw the
end of an answer cannot lose its charge). The same paths run through the real engine in test_http.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from deepserve.api.auth import Principal
from deepserve.billing import accounts
from deepserve.billing.db import Database
from deepserve.billing.meter import Charge, Meter
from deepserve.billing.money import TokenPrices, cost
from deepserve.engine.types import FinishReason, GenerateRequest, SamplingParams, TokenDelta
from deepserve.errors import InsufficientBalanceError
from tests.billing.conftest import count

PRICES = TokenPrices(input=1_000_000_000, cached_input=250_000_000, output=2_000_000_000)
GRANT = 10**9


def token(text: str = "", reasoning: str = "") -> TokenDelta:
    return TokenDelta(text=text, reasoning_text=reasoning, token_ids=[7])


def final(reason: FinishReason, *, num_prompt: int, num_cached: int = 0, num_generated: int,
          num_reasoning: int = 0) -> TokenDelta:
    return TokenDelta(token_ids=[7], finish_reason=reason, num_prompt_tokens=num_prompt, num_cached_tokens=num_cached,
                      num_generated_tokens=num_generated, num_reasoning_tokens=num_reasoning)


async def scripted(deltas: list[tuple[int, TokenDelta]]) -> AsyncIterator[tuple[int, TokenDelta]]:
    for item in deltas:
        yield item


class Metered:
    """A started meter on the test's database and an account with credits."""

    def __init__(self, db_url: str):
        self.db = Database(db_url)
        self.meter = Meter(self.db)
        self.account_id = 0

    async def __aenter__(self) -> Metered:
        from deepserve.billing import db as dbmod

        dbmod.upgrade(self.db.engine)
        await self.meter.start()
        self.account_id = accounts.ensure_account(self.db.engine, "metered")
        accounts.grant(self.db.engine, self.account_id, GRANT)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.meter.stop()
        self.db.close()

    async def charge(self, prompt_lengths: list[int], n: int, max_tokens: int) -> Charge:
        principal = Principal("test key", account_id=self.account_id)
        reservation = await self.meter.reserve(
            principal, model_names=("m",), catalog_prices=PRICES, num_prompt_tokens=sum(prompt_lengths),
            max_completion_tokens=max_tokens * n * len(prompt_lengths))
        return Charge(self.meter, reservation, prompt_lengths, n, "/v1/chat/completions", on_settled=lambda _: None)

    def usage_rows(self) -> list:
        with self.db.engine.connect() as conn:
            return conn.execute(sa.text("SELECT * FROM usage_records ORDER BY id")).all()

    def account(self) -> accounts.AccountInfo:
        return accounts.get_account(self.db.engine, self.account_id)


def test_a_finished_request_is_charged_before_its_last_delta_reaches_the_route(db_url):
    async def scenario() -> None:
        async with Metered(db_url) as m:
            charge = await m.charge([10], n=1, max_tokens=5)
            (stream,) = charge.wrap([scripted([(0, token("a")), (0, final(FinishReason.STOP, num_prompt=10,
                                                                            num_cached=4, num_generated=2))])])
            _, first = await stream.__anext__()
            assert first.finish_reason is None and count(m.db.engine, "usage_records") == 0
            _, last = await stream.__anext__()
            assert last.finish_reason == FinishReason.STOP
            # The route has not sent the end of the answer yet, and the charge is already committed.
            (row,) = m.usage_rows()
            expected = cost(PRICES, num_prompt=10, num_cached=4, num_completion=2)
            assert (row.status, row.num_prompt_tokens, row.num_cached_tokens, row.cost) == ("ok", 10, 4, expected)
            assert (m.account().balance, m.account().reserved) == (GRANT - expected, 0)
            await stream.aclose()  # closing afterwards settles nothing twice
            assert count(m.db.engine, "usage_records") == 1 and count(m.db.engine, "ledger") == 2

    asyncio.run(scenario())


def test_n_choices_settle_once_when_the_last_one_ends(db_url):
    async def scenario() -> None:
        async with Metered(db_url) as m:
            charge = await m.charge([6], n=2, max_tokens=4)
            (stream,) = charge.wrap([scripted([
                (0, token("a")), (1, token("b")),
                (0, final(FinishReason.STOP, num_prompt=6, num_generated=2)),
                (1, final(FinishReason.LENGTH, num_prompt=6, num_generated=4)),
            ])])
            for _ in range(3):
                await stream.__anext__()
            assert count(m.db.engine, "usage_records") == 0  # choice 1 is still generating
            await stream.__anext__()
            (row,) = m.usage_rows()
            # the prompt counts once for its n choices, as the usage the client sees counts it
            assert (row.num_prompt_tokens, row.num_completion_tokens) == (6, 6)
            assert row.cost == cost(PRICES, num_prompt=6, num_cached=0, num_completion=6)

    asyncio.run(scenario())


def test_a_stream_cut_off_is_charged_for_the_tokens_generated_hidden_reasoning_included(db_url):
    """Hidden reasoning shows no text, but every token the engine generated passed through and is billed."""

    async def scenario() -> None:
        async with Metered(db_url) as m:
            charge = await m.charge([8], n=1, max_tokens=50)
            (stream,) = charge.wrap([scripted([(0, token()), (0, token()), (0, token()), (0, token("x"))])])
            for _ in range(3):
                await stream.__anext__()
            await stream.aclose()  # the client left after three (hidden) reasoning tokens
            (row,) = m.usage_rows()
            assert (row.status, row.num_prompt_tokens, row.num_completion_tokens) == ("aborted", 8, 3)
            assert row.cost == cost(PRICES, num_prompt=8, num_cached=0, num_completion=3) < row.reserved
            assert m.account().reserved == 0

    asyncio.run(scenario())


def test_an_engine_failure_is_charged_for_what_was_computed_and_never_more_than_reserved(db_url):
    async def scenario() -> None:
        async with Metered(db_url) as m:
            charge = await m.charge([5], n=1, max_tokens=3)
            failed = final(FinishReason.ERROR, num_prompt=5, num_generated=2)
            (stream,) = charge.wrap([scripted([(0, token("a")), (0, failed)])])
            async for _ in stream:
                pass
            # an engine that reports more than the request may use is still charged at most its reservation
            runaway = await m.charge([5], n=1, max_tokens=3)
            (stream,) = runaway.wrap([scripted([(0, final(FinishReason.LENGTH, num_prompt=5, num_generated=300))])])
            async for _ in stream:
                pass
            failed_row, runaway_row = m.usage_rows()
            assert (failed_row.status, failed_row.num_completion_tokens) == ("error", 2)
            assert failed_row.cost == cost(PRICES, num_prompt=5, num_cached=0, num_completion=2)
            assert runaway_row.cost == runaway_row.reserved == runaway.reservation.amount
            balance, ledger_sum = accounts.check_ledger(m.db.engine, m.account_id)
            assert balance == ledger_sum == GRANT - failed_row.cost - runaway_row.cost
            assert m.account().reserved == 0

    asyncio.run(scenario())


def test_a_request_that_failed_before_the_engine_computed_any_of_it_is_charged_nothing(db_url):
    """The engine fails a request at its start (a grammar llama.cpp refuses) and says so (started false): its
    final delta's prompt count is not charged. A failure after the start still is (the test above)."""
    async def scenario() -> None:
        async with Metered(db_url) as m:
            charge = await m.charge([5], n=1, max_tokens=3)
            never = GenerateRequest([1, 2, 3, 4, 5], SamplingParams(max_tokens=3), started=False)
            (stream,) = charge.wrap([scripted([(0, final(FinishReason.ERROR, num_prompt=5, num_generated=0))])],
                                    [[never]])
            async for _ in stream:
                pass
            (row,) = m.usage_rows()
            assert (row.status, row.num_prompt_tokens, row.num_completion_tokens, row.cost) == ("error", 0, 0, 0)
            assert (m.account().balance, m.account().reserved) == (GRANT, 0)

    asyncio.run(scenario())


def test_a_request_the_engine_refused_releases_everything(db_url):
    async def scenario() -> None:
        async with Metered(db_url) as m:
            charge = await m.charge([5], n=1, max_tokens=3)
            assert m.account().reserved == charge.reservation.amount > 0
            await charge.release()
            assert m.usage_rows() == [] and (m.account().balance, m.account().reserved) == (GRANT, 0)

    asyncio.run(scenario())


def test_a_settle_the_database_refused_is_kept_and_retried_until_it_lands(db_url, monkeypatch):
    """The database away for longer than the quick retries: the usage is kept and settled at a later heartbeat
    (`retry_unsettled`), so the reservation is not locked and the tokens not lost while the process lives. A
    settle whose commit landed but whose answer was lost is not charged twice (one usage record per request)."""
    from sqlalchemy.exc import OperationalError

    from deepserve.billing import reservations

    real_settle = reservations.settle
    outage = {"calls": 0, "down": True}

    def flaky_settle(*args, **kwargs):
        outage["calls"] += 1
        if outage["down"]:
            raise OperationalError("UPDATE accounts ...", {}, Exception("the database is away"))
        return real_settle(*args, **kwargs)

    async def scenario() -> None:
        async with Metered(db_url) as m:
            charge = await m.charge([4], n=1, max_tokens=3)
            monkeypatch.setattr(reservations, "settle", flaky_settle)
            (stream,) = charge.wrap([scripted([(0, final(FinishReason.STOP, num_prompt=4, num_generated=1))])])
            async for _ in stream:
                pass
            assert outage["calls"] == 3 and m.usage_rows() == []
            assert m.account().reserved == charge.reservation.amount  # held, not lost
            assert await m.meter.retry_unsettled() == 1  # still away
            outage["down"] = False
            assert await m.meter.retry_unsettled() == 0
            (row,) = m.usage_rows()
            assert row.cost == cost(PRICES, num_prompt=4, num_cached=0, num_completion=1)
            assert (m.account().balance, m.account().reserved) == (GRANT - row.cost, 0)
            # The same settle again (as if its commit had landed unseen): refused by the unique request id.
            m.meter._unsettled.append((charge.reservation, charge.usage(), "/v1/chat/completions"))
            assert await m.meter.retry_unsettled() == 0
            assert len(m.usage_rows()) == 1 and m.account().balance == GRANT - row.cost
            balance, ledger_sum = accounts.check_ledger(m.db.engine, m.account_id)
            assert balance == ledger_sum

    asyncio.run(scenario())


def test_a_flexible_reservation_holds_what_the_balance_covers_and_no_less_than_its_minimum(db_url):
    """PRICES: 1,000 nano-dollars a prompt token, 2,000 a completion token; GRANT covers 10 prompt tokens and
    499,995 completion tokens at worst."""
    async def scenario() -> None:
        async with Metered(db_url) as m:
            principal = Principal("test key", account_id=m.account_id)

            async def reserve(max_completion: int, minimum: int | None) -> int:
                reservation = await m.meter.reserve(principal, model_names=("m",), catalog_prices=PRICES,
                                                    num_prompt_tokens=10, max_completion_tokens=max_completion,
                                                    min_completion_tokens=minimum)
                await m.meter.release(reservation)
                return reservation.max_completion_tokens

            assert await reserve(1000, 1) == 1000  # covered: as asked
            assert await reserve(10**6, 1) == 499_995  # not covered: what the balance covers
            with pytest.raises(InsufficientBalanceError):  # a max_tokens the client asked for: in full or refused
                await reserve(10**6, None)
            with pytest.raises(InsufficientBalanceError):  # fewer than the minimum: refused
                await reserve(10**7, 500_000)
            assert (m.account().balance, m.account().reserved) == (GRANT, 0)

    asyncio.run(scenario())
