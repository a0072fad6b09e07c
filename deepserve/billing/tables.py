"""The billing tables (SQLAlchemy 2 declarative). Alembic migrations in `migrations/` create them.

Money is integer nano-dollars (1e-9 USD) everywhere: balances, reservations, ledger amounts, costs, prices
(per million tokens). Two columns on `accounts` are caches kept in step inside the same transactions that
change what they summarise, so a reservation can be one conditional UPDATE:

    accounts.balance  == sum(ledger.amount of the account)
    accounts.reserved == sum(reservations.amount of the account)
    balance - reserved >= 0 (a CHECK constraint too: the database itself refuses an overspend)
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints: Alembic (and SQLite's batch mode) can find them again by name.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Naive UTC: stored the same way by SQLite and PostgreSQL, compared as such."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("reserved >= 0", name="reserved_not_negative"),
        CheckConstraint("balance - reserved >= 0", name="never_overspent"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ApiKey(Base):
    """A key is shown once at creation; only its sha256 is kept. `prefix` (the first characters) names it in
    listings and logs without revealing it."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    allowed_models: Mapped[str | None] = mapped_column(Text)  # JSON list of model ids/aliases; NULL: all
    rpm_limit: Mapped[int | None] = mapped_column(Integer)  # requests per minute; NULL: unlimited
    tpm_limit: Mapped[int | None] = mapped_column(Integer)  # tokens per minute; NULL: unlimited


class Price(Base):
    """The operator's price for a model, overriding the catalog's. Per million tokens, nano-dollars."""

    __tablename__ = "prices"
    __table_args__ = (CheckConstraint("input >= 0 AND cached_input >= 0 AND output >= 0", name="not_negative"),)

    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    input: Mapped[int] = mapped_column(BigInteger)
    cached_input: Mapped[int] = mapped_column(BigInteger)
    output: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Instance(Base):
    """A running server process. A reservation belongs to one; when the process is gone (its pid is dead on
    this machine, or its heartbeat is stale) another process releases what it held."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    machine: Mapped[str] = mapped_column(String(300))  # hostname, boot id and pid namespace
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Reservation(Base):
    """Money held for a request in flight: its worst-case cost. Deleted when the request settles."""

    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    model_id: Mapped[str] = mapped_column(String(200))
    amount: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class UsageRecord(Base):
    """One metered request, written at settle in the same transaction as its ledger row."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_day_key_model", "day", "key_id", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)  # the reservation id
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    model_id: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(16))  # ok | aborted | error
    num_prompt_tokens: Mapped[int] = mapped_column(Integer)
    num_cached_tokens: Mapped[int] = mapped_column(Integer)
    num_completion_tokens: Mapped[int] = mapped_column(Integer)  # reasoning tokens included
    num_reasoning_tokens: Mapped[int] = mapped_column(Integer)
    cost: Mapped[int] = mapped_column(BigInteger)
    reserved: Mapped[int] = mapped_column(BigInteger)
    day: Mapped[str] = mapped_column(String(10))  # UTC date, YYYY-MM-DD: the usage report groups by it
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class LedgerEntry(Base):
    """Every change of a balance is one row: grants and top-ups (positive), charges (negative)."""

    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))  # grant | top_up | adjust | charge
    usage_id: Mapped[int | None] = mapped_column(ForeignKey("usage_records.id"), unique=True)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class RateBucket(Base):
    """Token buckets of a rate-limited key, in the database so every replica sees the same ones.

    Levels are in units of 1/60000 of a request (or token), so that refilling `limit` per minute is exactly
    `limit` units per elapsed millisecond: integers throughout."""

    __tablename__ = "rate_buckets"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    request_level: Mapped[int] = mapped_column(BigInteger)
    token_level: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


class IdempotencyRecord(Base):
    """A request sent with an `Idempotency-Key`: in flight, then the stored response that a retry gets."""

    __tablename__ = "idempotency"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the caller's credential
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of method, path and body
    state: Mapped[str] = mapped_column(String(16))  # in_flight | done
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    status_code: Mapped[int | None] = mapped_column(Integer)
    headers: Mapped[str | None] = mapped_column(Text)  # JSON list of [name, value]
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
