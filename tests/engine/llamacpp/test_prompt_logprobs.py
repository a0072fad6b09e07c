"""Prompt logprobs (echo + logprobs): every prompt token scored, across prefill chunks and beside other requests,
as the prompt decoded alone scores them."""

from __future__ import annotations

import asyncio
import math

from deepserve.bundled import bundled_model_path
from deepserve.engine.llamacpp.loop import LlamaCppEngine
from deepserve.engine.llamacpp.runner import BatchEntry, LlamaRunner
from deepserve.engine.types import GenerateRequest, SamplingParams

TEXT = "The tide comes in twice a day because the moon pulls on the sea, and the sun helps a little. " * 3


def reference_logprobs(prompt: list[int], chunk: int = 16) -> list[float]:
    """Token k's logprob from the logits row of position k - 1, the prompt decoded alone with every row kept.

    In chunks as small as the engine's (batch_size 32): ggml computes micro-batches of more than 32 tokens with
    other kernels, which on this model moves a logprob by up to ~0.4 (measured); up to 32, results are equal."""
    runner = LlamaRunner(str(bundled_model_path()), ctx_size_per_seq=256, num_seqs=1, batch_size=256, num_threads=2)
    scores = []
    try:
        for start in range(0, len(prompt), chunk):
            tokens = prompt[start:start + chunk]
            first = runner.decode([BatchEntry(0, tokens, start, True, all_logits=True)])[0] - len(tokens) + 1
            scores += [runner.logprobs(first + k, prompt[start + k + 1], 0)[0]
                       for k in range(len(tokens)) if start + k + 1 < len(prompt)]
        return scores
    finally:
        runner.close()


async def score(engine: LlamaCppEngine, prompt: list[int]):
    other = engine.submit(GenerateRequest([1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)))
    scored, first = [], None
    async for delta in engine.submit(GenerateRequest(prompt, SamplingParams(temperature=0.0, max_tokens=2,
                                                                            prompt_logprobs=2))):
        scored += delta.prompt_logprobs
        if first is None:
            first = delta
    async for _ in other:
        pass
    return scored, first


def test_prompt_tokens_are_scored_across_chunks_and_beside_other_requests_as_the_prompt_alone():
    engine = LlamaCppEngine(str(bundled_model_path()), "smollm2", ctx_size=256, parallel=2, threads=2, batch_size=32)
    try:
        prompt = engine.tokenize(TEXT, add_special=False)
        assert len(prompt) > 2 * 32  # three chunks or more
        asyncio.run(score(engine, prompt))  # once, so that the second run finds the prompt cached in a slot
        scored, first = asyncio.run(score(engine, prompt))
    finally:
        engine.close()
    assert first.num_cached_tokens == 0  # scoring recomputes a cached prompt: a cached prefix has no logits
    assert first.prompt_logprobs == scored  # all of them come with the first token
    assert len(scored) == len(prompt) and scored[0].logprob is None
    assert b"".join(entry.token_bytes for entry in scored).decode() == TEXT
    expected = reference_logprobs(prompt)
    assert max(abs(entry.logprob - want) for entry, want in zip(scored[1:], expected)) < 2e-3
    assert all(len(entry.top) == 2 and entry.top[0][2] >= entry.logprob - 1e-6 for entry in scored[1:])
    assert not any(math.isnan(entry.logprob) for entry in scored[1:])
