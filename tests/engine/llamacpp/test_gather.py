"""The engine's first step after idle waits for a burst of arrivals (LlamaCppEngine._gather_burst), on the
bundled model, in-process: by time alone, or, with the server's count of requests on their way (`Arrivals`),
only while one is."""

from __future__ import annotations

import asyncio

from deepserve.bundled import bundled_model_path
from deepserve.engine.arrivals import Arrivals
from deepserve.engine.llamacpp.loop import LlamaCppEngine
from deepserve.engine.types import GenerateRequest, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def make_engine(gather_s: float, arrivals: Arrivals | None = None) -> LlamaCppEngine:
    return LlamaCppEngine(str(bundled_model_path()), "smollm2", ctx_size=256, parallel=4, threads=1,
                          gather_s=gather_s, gather_max_s=10 * gather_s, arrivals=arrivals)


def chat_prompt(engine: LlamaCppEngine) -> list[int]:
    return engine.tokenize("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", add_special=False)


async def drained(engine: LlamaCppEngine) -> None:
    """Until the engine thread has taken every submitted request out of its inbox (bounded)."""
    for _ in range(2000):
        with engine._lock:
            if not engine._inbox:
                return
        await asyncio.sleep(0.001)
    raise AssertionError("the engine never took the request")


async def burst(engine: LlamaCppEngine, prompt: list[int]) -> tuple[int, list[int]]:
    """Submit one request, let the engine see it, then a second one: steps taken before the second arrived, and
    how many tokens each request got."""
    first = engine.submit(GenerateRequest(list(prompt), PARAMS))
    first_tokens = asyncio.ensure_future(_count(first))
    await drained(engine)
    steps_before_second = engine.counters.num_steps
    second_tokens = await _count(engine.submit(GenerateRequest(list(prompt), PARAMS)))
    return steps_before_second, [await first_tokens, second_tokens]


async def _count(stream) -> int:
    return sum([len(d.token_ids) async for d in stream])


def test_a_request_arriving_while_the_first_waits_starts_in_the_same_step():
    engine = make_engine(0.5)  # long enough that the second request surely arrives within it
    try:
        prompt = engine.tokenize("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", add_special=False)
        steps_before_second, counts = asyncio.run(burst(engine, prompt))
        assert steps_before_second == 0  # the engine held the first step for more arrivals
        assert counts == [3, 3]
        # Both prompts in one step, then one decode per further token: nothing decoded twice or alone.
        assert engine.counters.num_steps == PARAMS.max_tokens
        assert engine.counters.max_seqs_in_step == 2
    finally:
        engine.close()



def test_without_a_count_of_arrivals_a_lone_request_waits_once():
    engine = make_engine(0.05)
    try:
        async def lone() -> int:
            return await _count(engine.submit(GenerateRequest(chat_prompt(engine), PARAMS)))

        assert asyncio.run(lone()) == 3
        assert engine.counters.num_burst_waits == 1  # it waited for more, which never came
    finally:
        engine.close()


def test_a_lone_request_the_server_counted_starts_without_waiting():
    arrivals = Arrivals()
    engine = make_engine(0.5, arrivals)
    try:
        async def lone() -> int:
            with arrivals.counted():
                return await _count(engine.submit(GenerateRequest(chat_prompt(engine), PARAMS)))

        assert asyncio.run(lone()) == 3
        assert engine.counters.num_burst_waits == 0  # nothing else was on its way
        assert engine.counters.num_steps == PARAMS.max_tokens
        assert arrivals.pending == 0
    finally:
        engine.close()


def test_a_request_still_on_its_way_holds_the_first_step_until_it_is_submitted():
    arrivals = Arrivals()
    engine = make_engine(0.5, arrivals)  # long enough that the second request surely arrives within it
    prompt = chat_prompt(engine)

    async def scenario() -> tuple[int, list[int]]:
        counted_in, submitted, go = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def second() -> int:
            with arrivals.counted():  # arrived at the server, still being prepared
                counted_in.set()
                await go.wait()
                return await _count(engine.submit(GenerateRequest(list(prompt), PARAMS)))

        async def first() -> int:
            with arrivals.counted():
                stream = engine.submit(GenerateRequest(list(prompt), PARAMS))
                submitted.set()
                return await _count(stream)

        second_task = asyncio.ensure_future(second())
        await counted_in.wait()
        first_task = asyncio.ensure_future(first())
        await submitted.wait()
        await drained(engine)
        steps_before_second = engine.counters.num_steps
        go.set()
        return steps_before_second, [await first_task, await second_task]

    try:
        steps_before_second, counts = asyncio.run(scenario())
        assert steps_before_second == 0  # the engine held its first step for the request on its way
        assert counts == [3, 3]
        assert engine.counters.num_steps == PARAMS.max_tokens
        assert engine.counters.max_seqs_in_step == 2
        assert engine.counters.num_burst_waits >= 1
        assert arrivals.pending == 0
    finally:
        engine.close()
