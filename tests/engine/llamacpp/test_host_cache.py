"""The host-memory prompt cache on the real engine (bundled model, in-process): a conversation pushed out of the
only slot by another one comes back from RAM, and generates exactly what it generates when computed afresh."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from deepserve.bundled import bundled_model_path
from deepserve.engine.llamacpp.loop import LlamaCppEngine
from deepserve.engine.prompt_cache import common_prefix_length
from deepserve.engine.types import SamplingParams
from tests.engine.llamacpp.streams import collect

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_engine(cache_ram_mib: int, *, parallel: int = 1, kv_unified: bool = False) -> LlamaCppEngine:
    return LlamaCppEngine(str(bundled_model_path()), "smollm2", ctx_size=512, parallel=parallel, threads=2,
                          cache_ram_mib=cache_ram_mib, kv_unified=kv_unified)


def chat(engine: LlamaCppEngine, text: str) -> list[int]:
    return engine.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special=False)


async def generate(engine: LlamaCppEngine, prompt: list[int]) -> tuple[list[int], int]:
    return await collect(engine, prompt, PARAMS)


def conversation(engine: LlamaCppEngine) -> tuple[list[int], list[int]]:
    first = chat(engine, "Tell me a long story about a lighthouse keeper and the storm that changed his life. " * 3)
    other = chat(engine, "What is the capital of France? Answer in one word, then explain why in detail. " * 3)
    return first, other


@dataclass
class ComeBack:
    first: list[int]
    other: list[int]
    fresh: list[int]  # `first`'s output computed afresh
    again: list[int]  # its output when asked again after `other` took the only slot
    cached_again: int  # prompt tokens reused the second time


def push_out_and_come_back(engine: LlamaCppEngine, meanwhile: Callable[[], None] = lambda: None) -> ComeBack:
    """`first`, then `other` in the only slot, then `first` again (`meanwhile` runs before it comes back)."""
    first, other = conversation(engine)
    fresh, _ = asyncio.run(generate(engine, first))
    asyncio.run(generate(engine, other))
    meanwhile()
    again, cached_again = asyncio.run(generate(engine, first))
    return ComeBack(first, other, fresh, again, cached_again)


@pytest.mark.parametrize("kv_unified", [False, True], ids=["split-kv", "unified-kv"])
def test_a_prompt_pushed_out_of_its_slot_is_restored_from_ram_and_decodes_the_same(kv_unified: bool):
    engine = make_engine(64, kv_unified=kv_unified)
    try:
        first, other = conversation(engine)
        fresh, cached_fresh = asyncio.run(generate(engine, first))
        assert cached_fresh == 0
        asyncio.run(generate(engine, other))  # takes the only slot: `first` (and its output) is saved to RAM
        assert engine.quiet.wait(30)  # and `other`'s too, while the engine idles
        stats = engine.stats()["prompt_cache"]
        assert stats["entries"] == 2 and stats["num_saved"] == 2
        # the last sampled token of each was never decoded
        assert stats["tokens"] == len(first) + len(other) + 2 * (PARAMS.max_tokens - 1)
        assert 0 < stats["bytes"] <= stats["limit_bytes"]

        again, cached_again = asyncio.run(generate(engine, first))
        assert cached_again == len(first) - 1  # all but the last prompt token, whose logits are sampled
        assert again == fresh  # the restored KV is the KV: greedy decoding goes the same way
        assert engine.quiet.wait(30)
        stats = engine.stats()["prompt_cache"]
        assert stats["num_restored"] == 1 and stats["num_restored_tokens"] == len(first) - 1
        assert stats["entries"] == 2 and stats["num_saved"] == 2  # both copies stay; `first`'s slot holds its copy
        assert engine.counters.num_cached_prompt_tokens == len(first) - 1 + common_prefix_length(first, other)
    finally:
        engine.close()


def test_without_the_ram_cache_the_pushed_out_prompt_is_computed_again():
    engine = make_engine(0)
    try:
        run = push_out_and_come_back(engine)
        assert engine.stats()["prompt_cache"] is None
        assert run.cached_again == common_prefix_length(run.first, run.other)  # only what `other` left in the slot
        assert run.again == run.fresh
    finally:
        engine.close()


def test_a_cache_too_small_for_one_state_keeps_nothing_and_still_serves():
    engine = make_engine(1)  # 1 MiB: less than one of these prompts' KV (about 23 KiB a token here)
    try:
        run = push_out_and_come_back(engine)
        stats = engine.stats()["prompt_cache"]
        assert stats["entries"] == 0 and stats["bytes"] == 0 and stats["num_saved"] == 0
        assert run.again == run.fresh
    finally:
        engine.close()


def test_a_state_that_cannot_be_copied_back_is_computed_from_the_start_and_decodes_the_same():
    engine = make_engine(64)

    def refuse_copies() -> None:  # as when a full unified KV pool refuses a saved state
        engine.runner.load_state = lambda seq_id, state: False

    try:
        run = push_out_and_come_back(engine, refuse_copies)
        assert run.cached_again == 0  # nothing reused: the whole prompt was computed
        assert run.again == run.fresh  # from position 0, not from where the copy would have ended
        assert engine.stats()["prompt_cache"]["num_restored"] == 0
    finally:
        engine.close()


def test_a_finished_slot_is_saved_while_the_engine_idles_not_when_the_next_request_comes():
    """The save that used to come on the next request's path (before its prefill overwrites the slot) is made while
    the engine has nothing to decode: the admission finds it covered, and the conversation still comes back."""
    engine = make_engine(64)
    try:
        first, other = conversation(engine)
        fresh, _ = asyncio.run(generate(engine, first))
        assert len(first) + len(fresh) >= 64
        assert engine.quiet.wait(30)  # idle, with nothing left to save
        assert engine.stats()["prompt_cache"]["num_saved"] == 1  # saved with no request waiting on it
        asyncio.run(generate(engine, other))  # takes the only slot: nothing more to save for `first`
        assert engine.quiet.wait(30)
        assert engine.stats()["prompt_cache"]["num_saved"] == 2  # `other`'s, saved idle in its turn
        again, cached = asyncio.run(generate(engine, first))
        assert again == fresh and cached >= len(first) - 1  # restored from RAM
    finally:
        engine.close()
