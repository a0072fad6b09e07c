"""For middlewares that read a request's body before the route (Idempotency-Key's fingerprint, the /completions
alias): read it whole, then hand the route a `receive` that replays it, or that raises again what the read raised."""

from __future__ import annotations

from starlette.types import Message, Receive


async def read_body(receive: Receive) -> tuple[bytes, list[Message], bool]:
    """(body, the messages that carried it, whether the client left before it was whole)."""
    messages: list[Message] = []
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", messages, True
        messages.append(message)
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts), messages, False


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """`messages` first, then whatever `receive` gives (a disconnect, once the client leaves)."""
    pending = list(messages)

    async def replay_receive() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay_receive


def raise_when_read(exc: Exception) -> Receive:
    """For a middleware that reads the body before the route and hit the limit (or another error) doing it: the
    route's own read raises it again, where FastAPI's handlers answer it in the caller's dialect (a 413), rather
    than the middleware's exception becoming a 500."""

    async def receive() -> Message:
        raise exc

    return receive
