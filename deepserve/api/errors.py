"""Maps every error to the caller's dialect envelope, in one place.

Each dialect registers the paths it owns (a prefix, or a predicate on the path) and a function that turns a
DeepserveError into its response; anything else (including FastAPI's own validation and routing errors) is
converted first. Renderers also get the request: a dialect may put per-caller facts in its error headers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from deepserve.errors import DeepserveError, InvalidRequestError, NotFoundError

log = logging.getLogger(__name__)

ErrorRenderer = Callable[[DeepserveError, Request], Response]
PathMatch = str | Callable[[str], bool]  # a path prefix, or a predicate on the path


def openai_error_response(error: DeepserveError, request: Request | None = None) -> Response:
    body = {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    problems: list[str] = []
    param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return InvalidRequestError(f"The request body is not valid JSON: {err.get('msg', '')}.")
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        problems.append(f"{where}: {err.get('msg')}")
    error = InvalidRequestError("Invalid request: " + "; ".join(problems), param=param)
    error.details = problems
    return error


def http_error(exc: StarletteHTTPException) -> DeepserveError:
    if exc.status_code == 404:
        return NotFoundError("Not found: no such route.")
    if exc.status_code == 405:
        error = DeepserveError("Method not allowed on this route.")
        error.status_code = 405
        error.error_type = "invalid_request_error"
    else:
        error = DeepserveError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    error.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return error


class ErrorRouter:
    def __init__(self, default: ErrorRenderer = openai_error_response):
        self._by_predicate: list[tuple[Callable[[str], bool], ErrorRenderer]] = []
        self._by_prefix: list[tuple[str, ErrorRenderer]] = []
        self._default = default

    def register(self, match: PathMatch, renderer: ErrorRenderer) -> None:
        """`match` is a path prefix (the longest matching one wins) or a predicate on the path (checked
        first, in registration order: for dialects whose paths share a prefix with another's)."""
        if callable(match):
            self._by_predicate.append((match, renderer))
            return
        self._by_prefix.append((match, renderer))
        self._by_prefix.sort(key=lambda item: -len(item[0]))  # most specific first

    def renderer_for(self, path: str) -> ErrorRenderer:
        for predicate, renderer in self._by_predicate:
            if predicate(path):
                return renderer
        for prefix, renderer in self._by_prefix:
            if path.startswith(prefix):
                return renderer
        return self._default

    def render(self, request: Request, error: DeepserveError) -> Response:
        return self.renderer_for(request.url.path)(error, request)

    def install(self, app: FastAPI) -> None:
        @app.exception_handler(DeepserveError)
        async def _deepserve(request: Request, exc: DeepserveError) -> Response:
            return self.render(request, exc)

        @app.exception_handler(RequestValidationError)
        async def _validation(request: Request, exc: RequestValidationError) -> Response:
            return self.render(request, validation_error(exc))

        @app.exception_handler(StarletteHTTPException)
        async def _http(request: Request, exc: StarletteHTTPException) -> Response:
            return self.render(request, http_error(exc))

        @app.exception_handler(Exception)
        async def _unexpected(request: Request, exc: Exception) -> Response:
            log.exception("unhandled error on %s", request.url.path)
            return self.render(request, DeepserveError("The server had an error while processing your request."))
