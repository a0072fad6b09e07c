"""Maps every error to the caller's dialect envelope, in one place.

Each dialect registers the paths it owns (a prefix, or a predicate on the path) and a function that turns a
DeepserveError into its response; anything else (including FastAPI's own validation and routing errors) is
converted first. Renderers also get the request: a dialect may put per-caller facts in its error headers.

FastAPI parses a route's body before its dependencies run, so a malformed or invalid body (or one over the size
limit) used to be answered before the key was looked at: a bad key got 400, not 401 (the providers check the
key first), and Segmind's x-remaining-credits said 0 for a funded key. Each dialect also registers how its
routes take the key; such an error on its paths authenticates first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from deepserve.errors import AuthenticationError, DeepserveError, InvalidRequestError, NotFoundError, PayloadTooLargeError

log = logging.getLogger(__name__)

ErrorRenderer = Callable[[DeepserveError, Request], Response]
PathMatch = str | Callable[[str], bool]  # a path prefix, or a predicate on the path
Authenticate = Callable[[Request], Awaitable[Any]]  # raises AuthenticationError (deepserve.api.auth.require_*)


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


def unexpected_error(path: str) -> DeepserveError:
    """What a caller gets for an error the code did not expect (logged here with its traceback; the caller sees
    no internals). Call it inside the `except` that caught the error."""
    log.exception("unhandled error on %s", path)
    return DeepserveError("The server had an error while processing your request.")


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
        self._by_predicate: list[tuple[Callable[[str], bool], ErrorRenderer, Authenticate | None]] = []
        self._by_prefix: list[tuple[str, ErrorRenderer, Authenticate | None]] = []
        self._default = default

    def register(self, match: PathMatch, renderer: ErrorRenderer, authenticate: Authenticate | None = None) -> None:
        """`match` is a path prefix (the longest matching one wins) or a predicate on the path (checked
        first, in registration order: for dialects whose paths share a prefix with another's). `authenticate`:
        how the routes there take their key, checked before a body error is answered."""
        if callable(match):
            self._by_predicate.append((match, renderer, authenticate))
            return
        self._by_prefix.append((match, renderer, authenticate))
        self._by_prefix.sort(key=lambda item: -len(item[0]))  # most specific first

    def _entry(self, path: str) -> tuple[ErrorRenderer, Authenticate | None]:
        for predicate, renderer, authenticate in self._by_predicate:
            if predicate(path):
                return renderer, authenticate
        for prefix, renderer, authenticate in self._by_prefix:
            if path.startswith(prefix):
                return renderer, authenticate
        return self._default, None

    def renderer_for(self, path: str) -> ErrorRenderer:
        return self._entry(path)[0]

    def render(self, request: Request, error: DeepserveError) -> Response:
        return self.renderer_for(request.url.path)(error, request)

    async def _key_first(self, request: Request, error: DeepserveError) -> DeepserveError:
        """A body error on a route that takes a key: a missing or bad key is the answer (401), and a good one
        is known to the renderer (its balance in Segmind's header)."""
        authenticate = self._entry(request.url.path)[1]
        if authenticate is None or getattr(request.state, "principal", None) is not None:
            return error
        try:
            await authenticate(request)
        except AuthenticationError as refused:
            return refused
        except Exception:  # the key store itself failed (its database down): the body error is still the answer
            log.warning("could not look up the key before answering a body error", exc_info=True)
        return error

    def install(self, app: FastAPI) -> None:
        @app.exception_handler(DeepserveError)
        async def _deepserve(request: Request, exc: DeepserveError) -> Response:
            if isinstance(exc, PayloadTooLargeError):
                return self.render(request, await self._key_first(request, exc))
            return self.render(request, exc)

        @app.exception_handler(RequestValidationError)
        async def _validation(request: Request, exc: RequestValidationError) -> Response:
            return self.render(request, await self._key_first(request, validation_error(exc)))

        @app.exception_handler(StarletteHTTPException)
        async def _http(request: Request, exc: StarletteHTTPException) -> Response:
            if isinstance(exc.__cause__, PayloadTooLargeError):
                # A chunked body past the limit is refused while FastAPI reads it (api/limits.py), and FastAPI
                # answers whatever its body read raised with a 400 "error parsing the body": unwrap ours (413).
                return self.render(request, await self._key_first(request, exc.__cause__))
            return self.render(request, http_error(exc))

        @app.exception_handler(Exception)
        async def _unexpected(request: Request, exc: Exception) -> Response:
            return self.render(request, unexpected_error(request.url.path))
