"""Liveness and readiness: llama-server's /health and NIM's /v1/health/{live,ready}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

router = APIRouter()


def _engines_ready(request: Request) -> bool:
    models = getattr(request.app.state, "models", None)
    return models is not None and all(m.engine.is_ready for m in models)


@router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: uptime checkers
@router.api_route("/v1/health", methods=["GET", "HEAD"], include_in_schema=False)  # llama-server answers both
async def health(request: Request) -> JSONResponse:
    ready = _engines_ready(request)
    body: dict[str, Any] = {"status": "ok" if ready else "loading"}
    if ready:
        body["engines"] = [m.engine.stats() for m in request.app.state.models]
    return JSONResponse(body, status_code=200 if ready else 503)


@router.api_route("/v1/health/live", methods=["GET", "HEAD"])  # HEAD: uptime checkers
async def live() -> dict[str, str]:
    return {"object": "health.response", "message": "Service is live."}


@router.api_route("/v1/health/ready", methods=["GET", "HEAD"])  # HEAD: uptime checkers
async def ready(request: Request) -> JSONResponse:
    if _engines_ready(request):
        return JSONResponse({"object": "health.response", "message": "Service is ready."})
    return JSONResponse({"object": "health.response", "message": "Service is not ready."}, status_code=503)
