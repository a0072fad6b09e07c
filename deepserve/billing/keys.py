"""API keys: made with 256 bits of randomness and a recognisable prefix, shown once, stored as a sha256.

A key is looked up by its hash (a high-entropy key needs no slow hash: nothing can be guessed from its sha256),
then compared again in constant time. A key is never logged, never put in an error message, and only its
first characters (`prefix`) name it in listings.

`KeyStore` is the server's key store: configured operator keys (unmetered) first, then the database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deepserve.api.auth import Principal, StaticKeyStore
from deepserve.billing.db import READONLY, Database
from deepserve.billing.tables import Account, ApiKey, utcnow
from deepserve.errors import AuthenticationError

KEY_PREFIX = "ds-"
PREFIX_LENGTH = 10  # "ds-" and 7 random characters: enough to tell keys apart in a listing

keys_table = ApiKey.__table__
accounts_table = Account.__table__


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True)
class KeyInfo:
    """What an operator sees of a key (never the key)."""

    id: int
    account: str
    name: str | None
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    allowed_models: list[str] | None
    rpm_limit: int | None
    tpm_limit: int | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= utcnow():
            return "expired"
        return "active"

    def to_json(self) -> dict:
        return {
            "id": self.id, "account": self.account, "name": self.name, "prefix": self.prefix, "state": self.state,
            "created_at": _iso(self.created_at), "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at), "allowed_models": self.allowed_models,
            "rpm_limit": self.rpm_limit, "tpm_limit": self.tpm_limit,
        }


def _iso(value: dt.datetime | None) -> str | None:
    return value.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z") if value is not None else None


def _info(row) -> KeyInfo:
    return KeyInfo(
        id=row.id, account=row.account, name=row.name, prefix=row.prefix, created_at=row.created_at,
        expires_at=row.expires_at, revoked_at=row.revoked_at,
        allowed_models=json.loads(row.allowed_models) if row.allowed_models else None,
        rpm_limit=row.rpm_limit, tpm_limit=row.tpm_limit,
    )


def _select_infos():
    return sa.select(keys_table, accounts_table.c.name.label("account")).join(
        accounts_table, accounts_table.c.id == keys_table.c.account_id
    )


def create_key(
    engine: Engine,
    account_id: int,
    *,
    name: str | None = None,
    expires_at: dt.datetime | None = None,
    allowed_models: list[str] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> tuple[str, KeyInfo]:
    """A new key for the account: (the key itself, to show once; what is stored of it)."""
    for value, what in ((rpm_limit, "rpm_limit"), (tpm_limit, "tpm_limit")):
        if value is not None and value < 1:
            raise ValueError(f"{what} must be at least 1 (or absent for no limit), got {value}")
    key = new_key()
    with engine.begin() as conn:
        key_id = conn.execute(
            sa.insert(keys_table).values(
                account_id=account_id, name=name, prefix=key[:PREFIX_LENGTH], key_hash=hash_key(key),
                created_at=utcnow(), expires_at=expires_at,
                allowed_models=json.dumps(sorted(set(allowed_models))) if allowed_models else None,
                rpm_limit=rpm_limit, tpm_limit=tpm_limit,
            ).returning(keys_table.c.id)
        ).scalar_one()
        info = _info(conn.execute(_select_infos().where(keys_table.c.id == key_id)).one())
    return key, info


def list_keys(engine: Engine, *, account_id: int | None = None, include_revoked: bool = True) -> list[KeyInfo]:
    query = _select_infos().order_by(keys_table.c.id)
    if account_id is not None:
        query = query.where(keys_table.c.account_id == account_id)
    if not include_revoked:
        query = query.where(keys_table.c.revoked_at.is_(None))
    with engine.connect().execution_options(**{READONLY: True}) as conn:
        return [_info(row) for row in conn.execute(query)]


def find_key(engine: Engine, id_or_prefix: str) -> KeyInfo:
    """A key by its id (e.g. 3) or its prefix (e.g. ds-AbC1234); LookupError names the problem."""
    query = _select_infos()
    if str(id_or_prefix).isdigit():
        query = query.where(keys_table.c.id == int(id_or_prefix))
    else:
        query = query.where(keys_table.c.prefix == str(id_or_prefix)[:PREFIX_LENGTH])
    with engine.connect().execution_options(**{READONLY: True}) as conn:
        rows = conn.execute(query).all()
    if not rows:
        raise LookupError(f"no key with id or prefix {id_or_prefix!r} (`deepserve keys list` shows them)")
    if len(rows) > 1:
        raise LookupError(f"several keys start with {id_or_prefix!r}: name one by its id")
    return _info(rows[0])


def revoke_key(engine: Engine, key_id: int) -> KeyInfo:
    """Revoke a key: every request with it gets 401 from now on, on every replica (no cache)."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(keys_table).where(keys_table.c.id == key_id, keys_table.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        row = conn.execute(_select_infos().where(keys_table.c.id == key_id)).one_or_none()
    if row is None:
        raise LookupError(f"no key with id {key_id}")
    return _info(row)


def lookup(engine: Engine, key: str) -> Principal:
    """The principal of a database key, with its account's available balance; AuthenticationError otherwise."""
    digest = hash_key(key)
    query = sa.select(
        keys_table, accounts_table.c.balance, accounts_table.c.reserved
    ).join(accounts_table, accounts_table.c.id == keys_table.c.account_id).where(keys_table.c.key_hash == digest)
    with engine.connect().execution_options(**{READONLY: True}) as conn:
        row = conn.execute(query).one_or_none()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise AuthenticationError("Incorrect API key provided.")
    if row.revoked_at is not None:
        raise AuthenticationError(f"This API key ({row.prefix}…) has been revoked.")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise AuthenticationError(f"This API key ({row.prefix}…) expired at {_iso(row.expires_at)}.")
    return Principal(
        key_name=f"key {row.id} ({row.prefix}…)",
        account_id=row.account_id,
        key_id=row.id,
        allowed_models=tuple(json.loads(row.allowed_models)) if row.allowed_models else None,
        rpm_limit=row.rpm_limit,
        tpm_limit=row.tpm_limit,
        available_nanodollars=row.balance - row.reserved,
    )


class KeyStore:
    """Configured operator keys (unmetered), then the billing database's keys (metered).

    Nothing is cached: a revoked key is refused by the next request, on every replica."""

    def __init__(self, db: Database, operator_keys: list[str], *, allow_anonymous: bool = False):
        self._db = db
        self._operator = StaticKeyStore(operator_keys)
        self.allow_anonymous = allow_anonymous

    async def authenticate(self, key: str | None, *, how: str = "Authorization: Bearer <key>") -> Principal:
        if self.allow_anonymous:
            return Principal("anonymous")
        if not key:
            raise AuthenticationError(f"You didn't provide an API key. Send it as '{how}'.")
        operator = self._operator.find(key)
        if operator is not None:
            return operator
        if not key.startswith(KEY_PREFIX) or len(key) > 200:  # not one of ours: no database trip
            raise AuthenticationError("Incorrect API key provided.")
        return await self._db.run(lookup, key)
