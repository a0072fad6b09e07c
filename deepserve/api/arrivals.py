"""Counts requests on their way to an engine (deepserve/engine/arrivals.py says why)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from deepserve.engine.arrivals import ARRIVALS, Arrivals


class CountArrivals:
    """ASGI middleware: each POST is counted from its arrival until it reaches an engine or ends (one that fails
    before, a 400 or a 401, is counted out then). Other methods never submit to an engine."""

    def __init__(self, app: ASGIApp, arrivals: Arrivals = ARRIVALS) -> None:
        self.app = app
        self.arrivals = arrivals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        with self.arrivals.counted():
            await self.app(scope, receive, send)
