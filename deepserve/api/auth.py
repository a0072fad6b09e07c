"""Who is calling: one place that authenticates every dialect.

`app.state.key_store.authenticate(key, how=...)` answers a Principal or raises AuthenticationError. The
server's store is `deepserve.billing.keys.KeyStore`: the keys in the billing database (metered), plus the
keys given by configuration (DEEPSERVE_API_KEYS, --api-key, the printed dev key: the operator's own,
unmetered). `StaticKeyStore` below is configuration only. Keys are compared in constant time and never
logged or echoed.
"""

from __future__ import annotations

import hmac
import inspect
from dataclasses import dataclass

from fastapi import Request

from deepserve.errors import AuthenticationError


@dataclass(frozen=True, slots=True)
class Principal:
    key_name: str  # how logs and listings name the key (e.g. its id and prefix): never the key itself
    account_id: int | None = None  # None: not metered (an operator key from configuration, or --no-auth)
    key_id: int | None = None
    allowed_models: tuple[str, ...] | None = None  # None: every model
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    available_nanodollars: int | None = None  # the account's balance less its reservations, when checked

    @property
    def is_metered(self) -> bool:
        return self.account_id is not None


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
        principal = self.find(key)
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        return principal

    def find(self, key: str) -> Principal | None:
        """The configured key equal to `key`, or None."""
        given = key.encode()
        matched = -1
        for i, known in enumerate(self._keys):  # check every key: timing reveals nothing
            if hmac.compare_digest(given, known):
                matched = i
        return Principal(f"key-{matched}") if matched >= 0 else None


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def _authenticated(request: Request, key: str | None, how: str) -> Principal:
    principal = request.app.state.key_store.authenticate(key, how=how)
    if inspect.isawaitable(principal):  # the database store looks keys up off the event loop
        principal = await principal
    request.state.principal = principal  # for error renderers and billing, which run outside the route
    if principal.available_nanodollars is not None:
        request.state.remaining_nanodollars = principal.available_nanodollars  # x-remaining-credits
    return principal


async def require_bearer(request: Request) -> Principal:
    """FastAPI dependency for routes that take `Authorization: Bearer <key>` (OpenAI, Workers AI, Dataoorts)."""
    return await _authenticated(request, bearer_token(request), "Authorization: Bearer <key>")


def api_key_header(request: Request) -> str | None:
    return request.headers.get("x-api-key", "").strip() or None


async def require_api_key(request: Request) -> Principal:
    """FastAPI dependency for routes that take `x-api-key: <key>` (Segmind). A Bearer header is not read."""
    return await _authenticated(request, api_key_header(request), "x-api-key: <key>")
