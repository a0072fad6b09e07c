"""Request bodies are read as JSON whatever Content-Type they come with.

Cloudflare's own Workers AI quick-start posts with `curl -H "Authorization: Bearer …" -d '{"prompt": …}'`, and
`curl -d` labels the body `application/x-www-form-urlencoded`; scripts and raw HTTP clients often send no label
or `text/plain`. The providers (and llama-server) parse such bodies as JSON; FastAPI only JSON-decodes a body
labelled JSON and fails the rest with "Input should be a valid dictionary", which does not point at the header.
Every deepserve endpoint takes JSON, so a body labelled otherwise (multipart aside) is relabelled JSON before
FastAPI sees it: a body that is not JSON still gets the dialect's malformed-JSON error.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def _is_json(content_type: bytes) -> bool:
    media_type = content_type.split(b";", 1)[0].strip().lower()
    return media_type == b"application/json" or media_type.endswith(b"+json")


class JsonBodies:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _WITH_BODY:
            content_type = next((value for name, value in scope["headers"] if name == b"content-type"), None)
            if content_type is None or not (_is_json(content_type) or content_type.lower().startswith(b"multipart/")):
                headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
