"""Dataoorts response bodies: the Workers AI result in Dataoorts' envelope, errors as plain strings.

Failure: `{"errors": ["<reason>", ...], "messages": [], "result": null, "success": false}` with the HTTP
status of the error (400 bad input, 401 bad key, 404 unknown model, 413, 429, 500, 503). A validation
failure lists one reason per invalid field, each naming the field and its allowed range.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from deepserve.api.workers_ai.render import choice_usage, with_reasoning
from deepserve.errors import DeepserveError
from deepserve.serving import ChoiceResult


def result_body(choice: ChoiceResult) -> dict[str, Any]:
    usage = dict(sorted(choice_usage(choice).items()))  # keys in the seed's (alphabetical) order
    result = with_reasoning({"response": choice.text, "usage": usage}, choice.reasoning_text)
    return {"errors": [], "messages": [], "result": result, "success": True}


def error_response(error: DeepserveError, request: Request | None = None) -> Response:
    body = {"errors": list(error.details) or [error.message], "messages": [], "result": None, "success": False}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)
