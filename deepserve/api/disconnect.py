"""Stop generating when the client hangs up, for every route, streaming or not.

Starlette notices a disconnect only while it streams; a non-streaming handler would generate its whole
answer for nobody. This ASGI middleware owns the `receive` channel: it forwards every message to the app
and, when `http.disconnect` arrives before the response is complete, cancels the app. The cancellation
reaches the engine stream's `finally`, which aborts the request within one engine step.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        response_complete = False

        async def tracked_send(message: Message) -> None:
            nonlocal response_complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                response_complete = True

        app_task = asyncio.ensure_future(self.app(scope, inbox.get, tracked_send))
        client_left = False

        async def pump() -> None:
            nonlocal client_left
            while True:
                message = await receive()
                inbox.put_nowait(message)
                if message["type"] == "http.disconnect":
                    if not response_complete and not app_task.done():
                        client_left = True
                        app_task.cancel()
                    return

        pump_task = asyncio.ensure_future(pump())
        try:
            await app_task
        except asyncio.CancelledError:
            if not client_left:  # we are being cancelled ourselves (shutdown): pass it on
                raise
        finally:
            pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump_task
