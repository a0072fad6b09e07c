"""What every dialect shares between its schema and its renderer.

`ServedModel` turns messages or a raw prompt into prompt tokens the way the model was trained
(GGUF chat template). `generate()` runs n choices of one request on the engine and yields
(choice index, delta) pairs, merged as they arrive. Dialects call these and never touch the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from deepserve.engine.base import Engine
from deepserve.engine.types import FinishReason, GenerateRequest, SamplingParams, TokenDelta, TokenLogprob, next_request_id
from deepserve.errors import ModelNotFoundError
from deepserve.templates.chat import ChatTemplate


@dataclass
class ServedModel:
    model_id: str
    engine: Engine
    template: ChatTemplate
    owned_by: str = "deepserve"
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def ctx_size(self) -> int:
        return self.engine.ctx_size

    def chat_prompt_tokens(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True, **template_kwargs)
        # The template writes BOS itself when the model wants one; never add a second.
        return self.engine.tokenize(text, add_special=False, parse_special=True)

    def text_prompt_tokens(self, prompt: str) -> list[int]:
        # A raw prompt is user text: special-token strings in it stay text.
        return self.engine.tokenize(prompt, add_special=True, parse_special=False)

    def resolve_max_tokens(self, requested: int | None, num_prompt_tokens: int) -> int:
        """An omitted max_tokens means "up to the end of the context window", as vLLM does."""
        if requested is not None:
            return requested
        return max(1, self.ctx_size - num_prompt_tokens)


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        self._models[model.model_id] = model

    def get(self, model_id: str) -> ServedModel:
        model = self._models.get(model_id)
        if model is None:
            available = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(
                f"The model `{model_id}` does not exist. Available models: {available}.", param="model"
            )
        return model

    def __iter__(self):
        return iter(self._models.values())

    def close(self) -> None:
        for model in self._models.values():
            model.engine.close()


@dataclass(slots=True)
class ChoiceResult:
    """One choice collected to its end (non-streaming responses)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0

    def add(self, delta: TokenDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.error = delta.error
            self.num_prompt_tokens = delta.num_prompt_tokens
            self.num_cached_tokens = delta.num_cached_tokens
            self.num_generated_tokens = delta.num_generated_tokens


def generate(
    engine: Engine, prompt_tokens: list[int], sampling: SamplingParams, n: int = 1
) -> AsyncIterator[tuple[int, TokenDelta]]:
    """Submit n choices now (errors such as a full queue raise here) and return their merged stream."""
    request_ids: list[str] = []
    streams: list[AsyncIterator[TokenDelta]] = []
    try:
        for i in range(n):
            # Distinct but reproducible seeds per choice: seed, seed+1, ...
            params = replace(sampling, seed=None if sampling.seed is None else sampling.seed + i)
            request = GenerateRequest(prompt_tokens=prompt_tokens, sampling=params, request_id=next_request_id())
            streams.append(engine.submit(request))
            request_ids.append(request.request_id)
    except Exception:
        for request_id in request_ids:
            engine.abort(request_id)
        raise
    return _merge(streams)


async def _merge(streams: list[AsyncIterator[TokenDelta]]) -> AsyncIterator[tuple[int, TokenDelta]]:
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for delta in stream:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, TokenDelta]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenDelta]) -> None:
        async with contextlib.aclosing(stream):
            async for delta in stream:
                queue.put_nowait((index, delta))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, delta = await queue.get()
            if delta.finish_reason is not None:
                remaining -= 1
            yield index, delta
    finally:
        for task in tasks:
            task.cancel()  # closing a pump's stream aborts its request in the engine
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_stream(stream: AsyncIterator[tuple[int, TokenDelta]], n: int) -> list[ChoiceResult]:
    """Drain a `generate()` stream into one result per choice."""
    results = [ChoiceResult(index=i) for i in range(n)]
    async with contextlib.aclosing(stream):
        async for index, delta in stream:
            results[index].add(delta)
    return results
