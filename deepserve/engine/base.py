"""The engine interface every engine implements (llama.cpp in-process today; upstream servers later)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from deepserve.engine.types import GenerateRequest, TokenDelta


class Engine(Protocol):
    model_id: str
    ctx_size: int  # the context window of one request: prompt + max_tokens must fit

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def submit(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Queue a request and return its stream of deltas; the last one has `finish_reason` set.

        Raises QueueFullError / ContextLengthError before anything is queued. Closing the stream
        early (a client that went away) aborts the request within one engine step.
        """
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...

    @property
    def is_ready(self) -> bool: ...

    def close(self) -> None: ...
