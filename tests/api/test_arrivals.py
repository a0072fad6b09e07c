"""CountArrivals: the server's count of requests on their way to an engine (deepserve/api/arrivals.py)."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deepserve.api.arrivals import CountArrivals
from deepserve.engine.arrivals import Arrivals, reached_engine


def test_the_middleware_counts_posts_for_their_lifetime_and_nothing_else():
    arrivals = Arrivals()
    seen: dict[str, list[int]] = {}

    async def endpoint(request: Request) -> JSONResponse:
        counts = [arrivals.pending]
        if request.query_params.get("submit"):
            reached_engine()
            counts.append(arrivals.pending)
        seen[f"{request.method} {request.url.query}"] = counts
        return JSONResponse({})

    app = CountArrivals(Starlette(routes=[Route("/", endpoint, methods=["GET", "POST"])]), arrivals)

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.post("/?submit=1")).status_code == 200
            assert (await client.post("/")).status_code == 200
            assert (await client.get("/")).status_code == 200

    asyncio.run(scenario())
    assert seen == {"POST submit=1": [1, 0], "POST ": [1], "GET ": [0]}
    assert arrivals.pending == 0
