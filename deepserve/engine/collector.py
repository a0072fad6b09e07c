"""Per-request bridge from the engine thread to asyncio.

The engine thread calls `put()`; the HTTP handler iterates the collector. `call_soon_threadsafe` is the
only thread crossing, so the asyncio side needs no locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from deepserve.engine.types import TokenDelta


class RequestCollector:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[TokenDelta] = asyncio.Queue()

    def put(self, delta: TokenDelta) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        except RuntimeError:  # event loop already closed (server shutting down)
            pass

    async def __aiter__(self) -> AsyncIterator[TokenDelta]:
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return
