"""Who is calling: one place that authenticates every dialect.

Keys come from configuration for now (DEEPSERVE_API_KEYS); the billing database replaces the key
store later without touching the routes. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from deepserve.errors import AuthenticationError


@dataclass(frozen=True, slots=True)
class Principal:
    key_name: str


class StaticKeyStore:
    def __init__(self, keys: list[str], *, allow_anonymous: bool = False):
        self._keys = [k.encode() for k in keys]
        self.allow_anonymous = allow_anonymous

    def authenticate(self, key: str | None, *, how: str = "Authorization: Bearer <key>") -> Principal:
        """`how` tells a caller without a key how this route takes it."""
        if self.allow_anonymous:
            return Principal("anonymous")
        if not key:
            raise AuthenticationError(f"You didn't provide an API key. Send it as '{how}'.")
        given = key.encode()
        matched = -1
        for i, known in enumerate(self._keys):  # check every key: timing reveals nothing
            if hmac.compare_digest(given, known):
                matched = i
        if matched < 0:
            raise AuthenticationError("Incorrect API key provided.")
        return Principal(f"key-{matched}")


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _authenticated(request: Request, key: str | None, how: str) -> Principal:
    principal = request.app.state.key_store.authenticate(key, how=how)
    request.state.principal = principal  # for error renderers and billing, which run outside the route
    return principal


async def require_bearer(request: Request) -> Principal:
    """FastAPI dependency for routes that take `Authorization: Bearer <key>` (OpenAI, Workers AI, Dataoorts)."""
    return _authenticated(request, bearer_token(request), "Authorization: Bearer <key>")


def api_key_header(request: Request) -> str | None:
    return request.headers.get("x-api-key", "").strip() or None


async def require_api_key(request: Request) -> Principal:
    """FastAPI dependency for routes that take `x-api-key: <key>` (Segmind). A Bearer header is not read."""
    return _authenticated(request, api_key_header(request), "x-api-key: <key>")
