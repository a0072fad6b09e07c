"""Billing facts on every response, whatever the dialect: `x-remaining-credits` and `x-ratelimit-*`.

Auth and the meter leave them in the request's state (`remaining_nanodollars`, `ratelimit_headers`); this
middleware writes them when the response starts, unless the route already did (Segmind writes its own).

`x-remaining-credits` is the account's available balance in US dollars as an exact decimal string (e.g.
"4.999871"): the balance less what requests in flight hold. On a complete answer it is the balance after this
call was charged; on a stream (whose headers go out first) it is what remains after its worst case was
reserved. Callers that are not metered (operator keys from configuration, --no-auth) get no header, on
Segmind's routes too (a "0" there would read as out of credits); an unknown caller on Segmind's gets "0".
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepserve.billing.money import dollars

CREDITS_HEADER = "x-remaining-credits"


def remaining_credits(state: Any) -> str | None:
    """The header's value from a request's state (a starlette State or the scope's dict), if known."""
    if isinstance(state, dict):
        nanodollars = state.get("remaining_nanodollars")
    else:
        nanodollars = getattr(state, "remaining_nanodollars", None)
    return dollars(nanodollars) if nanodollars is not None else None


class BillingHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # created here so every layer inside shares this one dict

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                extra: dict[str, str] = dict(state.get("ratelimit_headers") or {})
                credits = remaining_credits(state)
                if credits is not None:
                    extra[CREDITS_HEADER] = credits
                headers += [(k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
