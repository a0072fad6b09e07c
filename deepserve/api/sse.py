"""Server-sent events: framing, keep-alive comments and the streaming response.

A client that disconnects makes CancelOnDisconnect (api/disconnect.py) cancel the response; the cancellation
reaches the engine stream's `finally`, which aborts the request within one engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from deepserve.api.direct import DirectText, DirectWriter, open_direct
from deepserve.engine.types import attach_direct

DONE = b"data: [DONE]\n\n"
KEEPALIVE_INTERVAL_S = 10.0


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def keepalive_interval_s(scope: Scope) -> float:
    """The app's `sse_keepalive_s` (--sse-keepalive): how long a waiting response stays silent."""
    settings = getattr(scope["app"].state, "settings", None)
    return getattr(settings, "sse_keepalive_s", KEEPALIVE_INTERVAL_S)


def comment(text: str = "keep-alive") -> bytes:
    return f": {text}\n\n".encode()


class EventStreamResponse(Response):
    """Streams `events` in the request's own task, each as soon as the generator yields it, with a
    `: keep-alive` comment whenever none was written for the app's `sse_keepalive_s` (as DeepSeek does while a
    request waits in the queue), so proxies and clients do not time the stream out.

    Why not Starlette's StreamingResponse plus a pump task that times out its waits: that costs two task
    switches, a queue and a timeout per event, and StreamingResponse runs the stream in another anyio task
    too; at one stream that was ~15 % of the event loop's time per token, which the engine waits for
    (collector.Postbox). Here the keep-alive is a timer that fires only when the stream is idle, and it writes
    from its own short task, so the generator's waits are never timed out (which would cancel, and so abort,
    the request). Disconnects are CancelOnDisconnect's (api/disconnect.py): it cancels this task.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None,
                 direct: DirectText | None = None):
        self.events = events
        self.direct = direct  # plain text deltas the engine thread may write itself (api/direct.py)
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        direct = open_direct(scope, self.direct) if self.direct is not None else None
        if direct is not None and not attach_direct(self.direct.stream, direct):
            direct.close()
            direct = None
        writer = _Writer(send, keepalive_interval_s(scope), direct)
        try:
            async with contextlib.aclosing(self.events):  # type: ignore[type-var]
                async for chunk in self.events:
                    await writer.write(chunk if isinstance(chunk, bytes) else chunk.encode())
        finally:
            await writer.stop_keepalive()
            if direct is not None:
                direct.close()  # the engine is done with it, or writes nothing more once it is closed
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:  # a route's BackgroundTasks (FastAPI sets them here): after the answer
            await self.background()


class _Writer:
    """Body writes of one event stream, and the keep-alive timer that watches them."""

    __slots__ = ("_send", "_direct", "_loop", "_interval_s", "_last_write", "_busy", "_timer", "_comment_task")

    def __init__(self, send: Send, interval_s: float, direct: DirectWriter | None = None):
        self._send = send
        self._direct = direct
        self._loop = asyncio.get_running_loop()
        self._interval_s = interval_s
        self._last_write = self._loop.time()
        self._busy = False
        self._comment_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(interval_s, self._check)

    async def write(self, body: bytes) -> None:
        if self._direct is not None:
            self._direct.flush_rest()  # the end of a direct write comes first
        self._busy = True
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            self._busy = False
            self._last_write = self._loop.time()

    def _check(self) -> None:
        """Timer: write a comment if nothing was written for the interval, then look again an interval after
        the last write. One timer per stream, re-armed only when it fires (not per event)."""
        last_write = self._last_write
        if self._direct is not None:  # tokens the engine thread wrote count as writes
            last_write = max(last_write, self._direct.last_write_at)
        idle_s = self._loop.time() - last_write
        delay_s = self._interval_s - idle_s
        if delay_s <= 0:
            # A write stuck on a client that does not read (or a comment still going) needs no comment more.
            if not self._busy and self._comment_task is None:
                self._comment_task = self._loop.create_task(self._write_comment())
            delay_s = self._interval_s
        self._timer = self._loop.call_later(delay_s, self._check)

    async def _write_comment(self) -> None:
        direct = self._direct
        if direct is not None and direct.armed and direct.send_body(comment()):
            # While the engine thread may write (armed), a comment goes the same way, under the same lock.
            self._comment_task = None
            return
        try:
            await self.write(comment())
        except Exception:  # a broken connection: the stream's own next write or the disconnect reports it
            pass
        finally:
            self._comment_task = None

    async def stop_keepalive(self) -> None:
        """Before the final message: no comment may be written after it (a send after the end is an error)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._comment_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def sse_response(events: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 direct: DirectText | None = None) -> Response:
    return EventStreamResponse(events, headers, direct)
