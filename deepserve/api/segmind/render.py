"""Segmind's envelope: answers are OpenAI chat completions (deepserve.api.openai.render); every response of a
slug route carries `x-remaining-credits`; errors are `{"error": "<message>"}`.

Statuses as Segmind lists them: 401 bad or missing key, 404 unknown slug, 405 wrong method, 406 not enough
credits (our 402), 500 server error. Input that fails validation is 400, a body over the limit
413, a full queue 429 (with Retry-After), a server that is not ready 503.
"""

from __future__ import annotations

from fastapi import Request
from starlette.responses import JSONResponse, Response

from deepserve.api.auth import Principal
from deepserve.billing import headers as billing_headers
from deepserve.errors import DeepserveError, InsufficientBalanceError

CREDITS_HEADER = billing_headers.CREDITS_HEADER
NOT_ENOUGH_CREDITS = 406  # Segmind's status for an exhausted balance (InsufficientBalanceError, 402 elsewhere)


def remaining_credits(request: Request | None) -> str | None:
    """`x-remaining-credits`: the caller's available balance in US dollars, an exact decimal string (after this
    call's charge; for a stream, after its reservation). "0" when the caller is not known (no key, a bad key);
    None (no header) for a caller with no account to count down: an operator key or --no-auth, whose "0" a
    Segmind client would read as out of credits."""
    principal = principal_of(request)
    if principal is not None and not principal.is_metered:
        return None
    state = request.state if request is not None else None
    return (billing_headers.remaining_credits(state) if state is not None else None) or "0"


def credits_headers(request: Request | None) -> dict[str, str]:
    """The `x-remaining-credits` header of a response, or none (remaining_credits says when)."""
    credits = remaining_credits(request)
    return {CREDITS_HEADER: credits} if credits is not None else {}


def principal_of(request: Request | None) -> Principal | None:
    return getattr(request.state, "principal", None) if request is not None else None


def error_response(error: DeepserveError, request: Request | None = None) -> Response:
    headers = {**error.headers, **credits_headers(request)}
    status = NOT_ENOUGH_CREDITS if isinstance(error, InsufficientBalanceError) else error.status_code
    return JSONResponse({"error": error.message}, status_code=status, headers=headers)
