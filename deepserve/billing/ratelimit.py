"""Per-key rate limits (requests and tokens per minute) as token buckets in the database, so replicas on one
PostgreSQL share them. Each check is one conditional UPDATE, inside the request's reservation transaction.

A bucket holds at most a minute's worth and refills continuously: `limit` per minute is `limit` units per
millisecond with levels kept in 1/60000ths (integers, no rounding drift). A request takes one request and
its worst-case tokens (prompt + max_tokens x n); at settle the tokens it did not use go back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from deepserve.billing.tables import RateBucket
from deepserve.errors import RateLimitError

UNITS = 60_000  # bucket units per request or token: a minute in milliseconds
buckets = RateBucket.__table__


@dataclass(slots=True)
class RateState:
    """What the x-ratelimit-* headers say after a check."""

    rpm_limit: int | None
    tpm_limit: int | None
    request_level: int
    token_level: int

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.rpm_limit:
            headers["x-ratelimit-limit-requests"] = str(self.rpm_limit)
            headers["x-ratelimit-remaining-requests"] = str(max(0, self.request_level // UNITS))
            headers["x-ratelimit-reset-requests"] = _duration(self.rpm_limit * UNITS - self.request_level, self.rpm_limit)
        if self.tpm_limit:
            headers["x-ratelimit-limit-tokens"] = str(self.tpm_limit)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, self.token_level // UNITS))
            headers["x-ratelimit-reset-tokens"] = _duration(self.tpm_limit * UNITS - self.token_level, self.tpm_limit)
        return headers


def _wait_ms(missing_units: int, per_ms: int) -> int:
    return max(0, math.ceil(missing_units / per_ms))


def _duration(missing_units: int, per_ms: int) -> str:
    """OpenAI writes these as e.g. "1s" or "6m0s": the time until the bucket is full again."""
    seconds = math.ceil(_wait_ms(missing_units, per_ms) / 1000)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def _level_now(level, cap: int, per_ms: int, now_ms: int):
    """SQL: the bucket's level after refilling since `updated_ms` (a clock behind another replica's: none)."""
    now = sa.literal(now_ms, sa.BigInteger)
    elapsed = sa.case((now > buckets.c.updated_ms, now - buckets.c.updated_ms), else_=sa.literal(0, sa.BigInteger))
    refilled = level + elapsed * sa.literal(per_ms, sa.BigInteger)
    return sa.case((refilled > cap, sa.literal(cap, sa.BigInteger)), else_=refilled)


def _refill(level: int, updated_ms: int, cap: int, per_ms: int, now_ms: int) -> int:
    """Python twin of _level_now, for the refusal message."""
    return min(cap, level + max(0, now_ms - updated_ms) * per_ms)


def _ensure_bucket(conn: Connection, key_id: int, rpm: int | None, tpm: int | None, now_ms: int) -> None:
    values = {"key_id": key_id, "request_level": (rpm or 0) * UNITS, "token_level": (tpm or 0) * UNITS,
              "updated_ms": now_ms}
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(buckets).values(**values).on_conflict_do_nothing(index_elements=["key_id"]))


def admit(conn: Connection, key_id: int, rpm: int | None, tpm: int | None, num_tokens: int, now_ms: int) -> RateState:
    """Take one request and `num_tokens` tokens from the key's buckets, or raise RateLimitError (429) with
    Retry-After and the x-ratelimit-* headers."""
    if tpm and num_tokens > tpm:
        error = RateLimitError(
            f"This request may use up to {num_tokens} tokens (prompt + max_tokens x n), more than this key's "
            f"limit of {tpm} tokens per minute: lower max_tokens or shorten the prompt."
        )
        error.headers.update(RateState(rpm, tpm, (rpm or 0) * UNITS, tpm * UNITS).headers())
        error.headers["x-should-retry"] = "false"  # it never fits: SDKs must not retry it (see reservations.py)
        raise error
    _ensure_bucket(conn, key_id, rpm, tpm, now_ms)
    values: dict = {"updated_ms": sa.case((buckets.c.updated_ms > now_ms, buckets.c.updated_ms),
                                          else_=sa.literal(now_ms, sa.BigInteger))}
    conditions = [buckets.c.key_id == key_id]
    if rpm:
        requests_now = _level_now(buckets.c.request_level, rpm * UNITS, rpm, now_ms)
        values["request_level"] = requests_now - UNITS
        conditions.append(requests_now >= UNITS)
    if tpm:
        tokens_now = _level_now(buckets.c.token_level, tpm * UNITS, tpm, now_ms)
        values["token_level"] = tokens_now - num_tokens * UNITS
        conditions.append(tokens_now >= num_tokens * UNITS)
    row = conn.execute(
        sa.update(buckets).where(*conditions).values(**values)
        .returning(buckets.c.request_level, buckets.c.token_level)
    ).one_or_none()
    if row is not None:
        return RateState(rpm, tpm, row.request_level, row.token_level)
    # Refused: say which limit, and when to come back.
    current = conn.execute(sa.select(buckets).where(buckets.c.key_id == key_id)).one()
    request_level = _refill(current.request_level, current.updated_ms, (rpm or 0) * UNITS, rpm or 0, now_ms)
    token_level = _refill(current.token_level, current.updated_ms, (tpm or 0) * UNITS, tpm or 0, now_ms)
    waits, reasons = [], []
    if rpm and request_level < UNITS:
        waits.append(_wait_ms(UNITS - request_level, rpm))
        reasons.append(f"{rpm} requests per minute")
    if tpm and token_level < num_tokens * UNITS:
        waits.append(_wait_ms(num_tokens * UNITS - token_level, tpm))
        reasons.append(f"{tpm} tokens per minute (this request may use {num_tokens})")
    retry_after_s = max(1, math.ceil(max(waits, default=1000) / 1000))
    error = RateLimitError(
        f"Rate limit reached for this API key: {' and '.join(reasons)}. Retry after {retry_after_s}s."
    )
    error.headers.update(RateState(rpm, tpm, request_level, token_level).headers())
    error.headers["Retry-After"] = str(retry_after_s)
    raise error


def refund_tokens(conn: Connection, key_id: int, tpm: int, num_tokens: int) -> None:
    """Give back tokens a request reserved but did not use (never above a full bucket)."""
    if num_tokens <= 0:
        return
    cap = tpm * UNITS
    refilled = buckets.c.token_level + num_tokens * UNITS
    conn.execute(
        sa.update(buckets).where(buckets.c.key_id == key_id)
        .values(token_level=sa.case((refilled > cap, sa.literal(cap, sa.BigInteger)), else_=refilled))
    )
