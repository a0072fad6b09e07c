"""Body size limit as plain ASGI middleware: it must see the body before FastAPI parses it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepserve.errors import PayloadTooLargeError


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int, on_too_large):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_too_large = on_too_large  # (scope, error) -> ASGI response, in the caller's dialect

    def _error(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"The request body is larger than the limit of {self.max_body_bytes} bytes.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self.on_too_large(scope, self._error())(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)

