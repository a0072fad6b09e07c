"""The count of requests on their way to an engine (deepserve/engine/arrivals.py)."""

from __future__ import annotations

import asyncio

from deepserve.engine.arrivals import Arrivals, reached_engine


def test_a_request_is_counted_until_it_reaches_an_engine_once():
    arrivals = Arrivals()
    with arrivals.counted():
        assert arrivals.pending == 1
        reached_engine()
        assert arrivals.pending == 0
        reached_engine()  # n choices: the second submit counts nothing
        assert arrivals.pending == 0
    assert arrivals.pending == 0


def test_a_request_that_never_reaches_an_engine_is_counted_out_when_it_ends():
    arrivals = Arrivals()
    try:
        with arrivals.counted():
            assert arrivals.pending == 1
            raise ValueError("a 400 before the engine")
    except ValueError:
        pass
    assert arrivals.pending == 0


def test_outside_a_counted_request_reaching_an_engine_counts_nothing():
    arrivals = Arrivals()
    with arrivals.counted():
        pass
    reached_engine()
    assert arrivals.pending == 0


def test_concurrent_requests_each_count_out_only_themselves():
    arrivals = Arrivals()

    async def scenario() -> list[int]:
        seen: list[int] = []
        both_in = asyncio.Event()
        first_reached = asyncio.Event()

        async def first() -> None:
            with arrivals.counted():
                await both_in.wait()
                reached_engine()
                seen.append(arrivals.pending)  # the second is still on its way
                first_reached.set()

        async def second() -> None:
            with arrivals.counted():
                both_in.set()
                await first_reached.wait()
                reached_engine()
                seen.append(arrivals.pending)

        await asyncio.gather(first(), second())
        return seen

    assert asyncio.run(scenario()) == [1, 0]
    assert arrivals.pending == 0
