"""A non-streaming answer that may be long in coming, with blank lines while it is: DeepSeek's behaviour.

DeepSeek's API documents it: while a non-streaming request waits, the API "continuously returns empty lines"
(and SSE `: keep-alive` comments for streams: api/sse.py). A request queued behind others (up to --max-queue)
or generating a long answer would otherwise send nothing for minutes, and a proxy in front (nginx's default
proxy_read_timeout is 60 s) or a client's read timeout cuts it. JSON parsers skip leading whitespace, so the
openai SDK and `json.loads` read the answer unchanged.

An answer ready within the app's `sse_keepalive_s` goes out as before: its own status, headers and errors. Past
that the 200 is sent; an error after it can no longer change the status and goes out as the dialect's error
body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from deepserve.api.errors import unexpected_error
from deepserve.api.sse import keepalive_interval_s
from deepserve.errors import DeepserveError

BLANK_LINE = b"\n"


class JsonAfterBlankLines(Response):
    """Awaits `answer` (a Response with a JSON body); writes a blank line every `sse_keepalive_s` it is late.
    `render_error` turns an error raised after the 200 into the error Response whose body is sent instead."""

    media_type = "application/json"

    def __init__(self, answer: Awaitable[Response], render_error: Callable[[DeepserveError], Response]):
        self.answer = answer
        self.render_error = render_error
        self.status_code = 200
        self.background = None
        self.init_headers({})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        interval_s = keepalive_interval_s(scope)
        task = asyncio.ensure_future(self.answer)
        try:
            await asyncio.wait({task}, timeout=interval_s)
            if task.done():  # in time: the answer as it is, its errors to the app's handlers
                await task.result()(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            while not task.done():
                await send({"type": "http.response.body", "body": BLANK_LINE, "more_body": True})
                await asyncio.wait({task}, timeout=interval_s)
            try:
                body = task.result().body
            except DeepserveError as error:
                body = self.render_error(error).body
            except Exception:  # the status is sent: the error goes in the body, as the app's handler words it
                body = self.render_error(unexpected_error(scope["path"])).body
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            if not task.done():  # the client left (CancelOnDisconnect cancels us): abort the generation
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
