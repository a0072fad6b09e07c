"""`POST /completions` is two APIs: DeepSeek's (OpenAI's legacy completions at its base URL without /v1, with a
`model`) and llama-server's alias of its own `/completion` (no `model`: llama-server serves one). A body without
`model` goes to the llama.cpp route; one with it stays OpenAI's, which requires it."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from deepserve.api.bodies import raise_when_read, read_body, replaying

ALIAS, NATIVE = "/completions", "/completion"


class NativeCompletionsAlias:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != ALIAS or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        # The whole body, read once (BodySizeLimit, outside, bounds it) and handed on as it came.
        try:
            body, messages, disconnected = await read_body(receive)
        except Exception as exc:  # past the size limit: raised again where the route reads it, answered there (413)
            await self.app(scope, raise_when_read(exc), send)
            return
        if not disconnected and _names_no_model(body):
            scope = {**scope, "path": NATIVE, "raw_path": NATIVE.encode()}
        await self.app(scope, replaying(messages, receive), send)  # a client that left: the route sees it


def _names_no_model(body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:  # not JSON: OpenAI's route answers it (a 400 in its envelope)
        return False
    return isinstance(parsed, dict) and "model" not in parsed

