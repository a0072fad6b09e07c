"""Workers AI response bodies, stream events and the Cloudflare v4 error envelope (plain dicts)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from deepserve.api import sse
from deepserve.engine.types import TokenDelta
from deepserve.errors import (
    AuthenticationError,
    DeepserveError,
    InsufficientBalanceError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QueueFullError,
    RateLimitError,
    ServiceUnavailableError,
)
from deepserve.serving import ChoiceResult

# Cloudflare's published Workers AI error codes (internal code, HTTP status).
AUTHENTICATION_ERROR = 10000  # 401
NO_SUCH_MODEL = 5007  # 400
INVALID_DATA = 5004  # 400
REQUEST_TOO_LARGE = 3006  # 413
ACCOUNT_LIMITED = 3036  # 429: allocation used up (an exhausted balance)
MODEL_NOT_ALLOWED = 5018  # 403: this account (key) may not use this model
OUT_OF_CAPACITY = 3040  # 429
# Not in Cloudflare's Workers AI table: the v4 API's routing codes, and the code for a failure on our side.
NO_ROUTE = 7000  # 404
METHOD_NOT_ALLOWED = 7001  # 405
INTERNAL_ERROR = 3043  # 500

# Most specific class first. (code, status); a None status keeps the error's own.
_CODES: list[tuple[type[DeepserveError], int, int | None]] = [
    (AuthenticationError, AUTHENTICATION_ERROR, 401),
    (ModelNotFoundError, NO_SUCH_MODEL, 400),
    (NotFoundError, NO_ROUTE, 404),
    (PayloadTooLargeError, REQUEST_TOO_LARGE, 413),
    (InvalidRequestError, INVALID_DATA, 400),
    (QueueFullError, OUT_OF_CAPACITY, 429),
    (InsufficientBalanceError, ACCOUNT_LIMITED, 429),
    (RateLimitError, ACCOUNT_LIMITED, 429),
    (PermissionDeniedError, MODEL_NOT_ALLOWED, 403),
    (ServiceUnavailableError, OUT_OF_CAPACITY, None),
]


def cloudflare_code(error: DeepserveError) -> tuple[int, int]:
    """The (internal code, HTTP status) Cloudflare would answer for this error."""
    for kind, code, status in _CODES:
        if isinstance(error, kind):
            return code, status or error.status_code
    if error.status_code == 405:
        return METHOD_NOT_ALLOWED, 405
    if error.status_code < 500:
        return INVALID_DATA, error.status_code
    return INTERNAL_ERROR, error.status_code


def errors_body(code: int, message: str) -> dict[str, Any]:
    return {"result": None, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def error_response(error: DeepserveError, request: Request | None = None) -> Response:
    code, status = cloudflare_code(error)
    return JSONResponse(errors_body(code, error.message), status_code=status, headers=error.headers)


def usage(num_prompt: int, num_generated: int, num_reasoning: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_generated, "total_tokens": num_prompt + num_generated,
            "completion_tokens_details": {"reasoning_tokens": num_reasoning}}


def choice_usage(choice: ChoiceResult) -> dict[str, Any]:
    return usage(choice.num_prompt_tokens, choice.num_generated_tokens, choice.num_reasoning_tokens)


def with_reasoning(body: dict[str, Any], reasoning: str) -> dict[str, Any]:
    """A reasoning model's thinking (deepseek reasoning_format) beside `response`, under both names."""
    if reasoning:
        body["reasoning_content"] = body["reasoning"] = reasoning
    return body


def result_body(choice: ChoiceResult) -> dict[str, Any]:
    return {
        "result": with_reasoning({"response": choice.text, "usage": choice_usage(choice)}, choice.reasoning_text),
        "success": True,
        "errors": [],
        "messages": [],
    }


def stream_event(delta: TokenDelta) -> bytes | None:
    """The SSE event for one engine delta: its text, then (on the last) an empty response with the usage."""
    if delta.error is not None:
        return sse.event(errors_body(INTERNAL_ERROR, f"The engine failed while generating: {delta.error}"))
    text = with_reasoning({"response": delta.text}, delta.reasoning_text) if delta.text or delta.reasoning_text else None
    if delta.finish_reason is not None:
        final = {"response": "", "usage": usage(delta.num_prompt_tokens, delta.num_generated_tokens,
                                                delta.num_reasoning_tokens)}
        return (sse.event(text) if text else b"") + sse.event(final)
    return sse.event(text) if text else None
