"""Segmind's envelope: answers are OpenAI chat completions (deepserve.api.openai.render); every response of a
slug route carries `x-remaining-credits`; errors are `{"error": "<message>"}`.

Statuses as Segmind lists them: 401 bad or missing key, 404 unknown slug, 405 wrong method, 406 not enough
credits (once billing lands), 500 server error. Input that fails validation is 400, a body over the limit
413, a full queue 429 (with Retry-After), a server that is not ready 503.
"""

from __future__ import annotations

from fastapi import Request
from starlette.responses import JSONResponse, Response

from deepserve.api.auth import Principal
from deepserve.errors import DeepserveError

CREDITS_HEADER = "x-remaining-credits"
NOT_ENOUGH_CREDITS = 406  # Segmind's status for an exhausted balance: for billing


def remaining_credits(principal: Principal | None) -> str:
    """The caller's balance after this call, for `x-remaining-credits`. Nothing is metered yet: a placeholder."""
    return "0"


def principal_of(request: Request | None) -> Principal | None:
    return getattr(request.state, "principal", None) if request is not None else None


def error_response(error: DeepserveError, request: Request | None = None) -> Response:
    headers = {**error.headers, CREDITS_HEADER: remaining_credits(principal_of(request))}
    return JSONResponse({"error": error.message}, status_code=error.status_code, headers=headers)
