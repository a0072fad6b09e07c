"""Server-sent events: framing, keep-alive comments and the streaming response.

A client that disconnects makes Starlette cancel the response; the cancellation reaches the
engine stream's `finally`, which aborts the request within one engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"
KEEPALIVE_INTERVAL_S = 10.0
_END = object()


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def comment(text: str = "keep-alive") -> bytes:
    return f": {text}\n\n".encode()


async def with_keepalive(events: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """Yield `events`, plus a `: keep-alive` comment whenever none came for `interval_s` (as DeepSeek
    does while a request waits in the queue), so proxies and clients do not time the stream out.

    The events are pulled by a separate task: timing out a wait on a queue is safe, whereas timing out
    the generator itself would cancel (and so abort) the request.
    """
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=64)

    async def pump() -> None:
        try:
            async with contextlib.aclosing(events):
                async for item in events:
                    await queue.put(item)
        except Exception as exc:  # surfaced to the consumer below
            await queue.put(exc)
        await queue.put(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            if queue.empty():
                try:
                    async with asyncio.timeout(interval_s):  # no task per event, unlike wait_for on 3.11
                        item = await queue.get()
                except TimeoutError:
                    yield comment()
                    continue
            else:
                item = queue.get_nowait()
            # Send the events that are ready together: one write (one syscall, one TCP segment) rather than
            # one each, e.g. the last token, the usage chunk and [DONE] of a finished stream.
            batch: list[bytes] = []
            while isinstance(item, bytes):
                batch.append(item)
                if queue.empty():
                    item = None
                    break
                item = queue.get_nowait()
            if batch:
                yield batch[0] if len(batch) == 1 else b"".join(batch)
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            if item is not None:  # an event given as str: as it is
                yield item  # type: ignore[misc]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that adds keep-alive comments at the interval the app's settings give."""

    async def __call__(self, scope, receive, send) -> None:
        settings = getattr(scope["app"].state, "settings", None)
        interval_s = getattr(settings, "sse_keepalive_s", KEEPALIVE_INTERVAL_S)
        self.body_iterator = with_keepalive(self.body_iterator, interval_s)
        await super().__call__(scope, receive, send)


def sse_response(events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return EventStreamResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )
