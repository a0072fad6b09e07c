"""The engine's first step after idle waits for a burst of arrivals (LlamaCppEngine._gather_burst), on the
bundled model, in-process."""

from __future__ import annotations

import asyncio

from deepserve.bundled import bundled_model_path
from deepserve.engine.llamacpp.loop import LlamaCppEngine
from deepserve.engine.types import GenerateRequest, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def make_engine(gather_s: float) -> LlamaCppEngine:
    return LlamaCppEngine(str(bundled_model_path()), "smollm2", ctx_size=256, parallel=4, threads=1,
                          gather_s=gather_s, gather_max_s=10 * gather_s)


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

