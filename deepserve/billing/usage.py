"""Usage reports: the usage records summed by day (UTC), key and model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deepserve.billing.db import READONLY
from deepserve.billing.money import dollars
from deepserve.billing.tables import Account, ApiKey, UsageRecord

usage_records = UsageRecord.__table__
keys_table = ApiKey.__table__
accounts_table = Account.__table__

COLUMNS = ("day", "account", "key_id", "key_prefix", "model", "num_requests", "num_prompt_tokens",
           "num_cached_tokens", "num_completion_tokens", "num_reasoning_tokens", "cost_nanodollars", "cost_usd")


@dataclass(slots=True)
class UsageRow:
    day: str
    account: str
    key_id: int | None
    key_prefix: str | None
    model: str
    num_requests: int
    num_prompt_tokens: int
    num_cached_tokens: int
    num_completion_tokens: int
    num_reasoning_tokens: int
    cost_nanodollars: int

    @property
    def cost_usd(self) -> str:
        return dollars(self.cost_nanodollars)

    def to_json(self) -> dict:
        return {**asdict(self), "cost_usd": self.cost_usd}


def report(
    engine: Engine,
    *,
    account_id: int | None = None,
    key_id: int | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[UsageRow]:
    """One row per (day, key, model); `since`/`until` are inclusive YYYY-MM-DD days."""
    u = usage_records
    query = (
        sa.select(
            u.c.day, accounts_table.c.name, u.c.key_id, keys_table.c.prefix, u.c.model_id,
            sa.func.count(), sa.func.sum(u.c.num_prompt_tokens), sa.func.sum(u.c.num_cached_tokens),
            sa.func.sum(u.c.num_completion_tokens), sa.func.sum(u.c.num_reasoning_tokens), sa.func.sum(u.c.cost),
        )
        .join(accounts_table, accounts_table.c.id == u.c.account_id)
        .outerjoin(keys_table, keys_table.c.id == u.c.key_id)
        .group_by(u.c.day, accounts_table.c.name, u.c.key_id, keys_table.c.prefix, u.c.model_id)
        .order_by(u.c.day, accounts_table.c.name, u.c.key_id, u.c.model_id)
    )
    if account_id is not None:
        query = query.where(u.c.account_id == account_id)
    if key_id is not None:
        query = query.where(u.c.key_id == key_id)
    if model is not None:
        query = query.where(u.c.model_id == model)
    if since is not None:
        query = query.where(u.c.day >= since)
    if until is not None:
        query = query.where(u.c.day <= until)
    with engine.connect().execution_options(**{READONLY: True}) as conn:
        return [UsageRow(r[0], r[1], r[2], r[3], r[4], *(int(v or 0) for v in r[5:])) for r in conn.execute(query)]


def totals(engine: Engine, account_id: int) -> tuple[int, int]:
    """(number of usage records, sum of their costs) of an account."""
    u = usage_records
    with engine.connect().execution_options(**{READONLY: True}) as conn:
        count, total = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(u.c.cost), 0)).where(u.c.account_id == account_id)
        ).one()
    return int(count), int(total)
