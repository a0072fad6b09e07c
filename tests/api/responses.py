"""Driving a Starlette response by hand, as the server would: the scope it reads its settings from, a client
that never sends, and the bodies it wrote (tests of api/sse.py and api/keepalive.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace


def scope(keepalive_s: float) -> dict:
    settings = SimpleNamespace(sse_keepalive_s=keepalive_s)
    return {"type": "http", "path": "/v1/chat/completions", "app": SimpleNamespace(state=SimpleNamespace(settings=settings))}


async def never_receive() -> dict:
    await asyncio.Event().wait()
    return {}


def bodies(sent: list[dict]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body"]
