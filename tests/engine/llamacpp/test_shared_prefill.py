"""Requests that share a prompt compute it once (LlamaCppEngine copies a busy slot's KV), on the bundled model,
in-process: same tokens as each computed alone."""

from __future__ import annotations

import asyncio

from deepserve.bundled import bundled_model_path
from deepserve.engine.llamacpp.loop import LlamaCppEngine
from deepserve.engine.types import SamplingParams
from tests.engine.llamacpp.streams import collect

PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


async def run_all(engine: LlamaCppEngine, prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    return await asyncio.gather(*(collect(engine, p, PARAMS) for p in prompts))


def test_a_burst_of_identical_prompts_is_prefilled_once_and_decodes_like_each_alone():
    text = "<|im_start|>user\n" + "Explain how tides work, step by step, for a curious child. " * 3 + \
           "<|im_end|>\n<|im_start|>assistant\n"
    alone = LlamaCppEngine(str(bundled_model_path()), "smollm2", ctx_size=512, parallel=1, threads=2, cache_ram_mib=0)
    try:
        prompt = alone.tokenize(text, add_special=False)
        [(expected, _)] = asyncio.run(run_all(alone, [prompt]))
    finally:
        alone.close()

    engine = LlamaCppEngine(str(bundled_model_path()), "smollm2", ctx_size=512, parallel=4, threads=2,
                            gather_s=0.5, gather_max_s=2.0)  # the four arrive in one burst
    try:
        results = asyncio.run(run_all(engine, [prompt] * 4))
        assert [tokens for tokens, _ in results] == [expected] * 4
        assert sorted(cached for _, cached in results) == [0] + [len(prompt) - 1] * 3  # one computed it
        stats = engine.stats()
        assert stats["num_shared_prompt_tokens"] == 3 * (len(prompt) - 1)
        assert stats["num_prompt_tokens"] - stats["num_cached_prompt_tokens"] == len(prompt) + 3
    finally:
        engine.close()
