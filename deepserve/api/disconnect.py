"""Non-streaming requests: stop generating when the client hangs up before the answer is ready.

Starlette only notices a disconnect while it sends; a non-streaming handler sends once, at the end.
So the handler's work runs in a task beside a watcher on the ASGI receive channel, which reports
`http.disconnect` when the client goes away; then the work is cancelled, which aborts its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from deepserve.errors import DeepserveError

T = TypeVar("T")


class ClientDisconnected(DeepserveError):
    status_code = 499  # nginx's "client closed request": nobody reads it, but logs do
    error_type = "client_disconnected"


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected("The client closed the connection before the response was ready.")
