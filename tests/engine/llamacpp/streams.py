"""Drive the real engine in-process: what one request's stream gives."""

from __future__ import annotations

from deepserve.engine.llamacpp.loop import LlamaCppEngine
from deepserve.engine.types import GenerateRequest, SamplingParams


async def collect(engine: LlamaCppEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
    """The request's output tokens, and how many prompt tokens the engine reused (cached_tokens)."""
    tokens, cached = [], -1
    async for delta in engine.submit(GenerateRequest(list(prompt), params)):
        tokens += delta.token_ids
        if delta.finish_reason is not None:
            cached = delta.num_cached_tokens
    return tokens, cached
