"""Operator operations on accounts, credits and prices (the CLI and the admin API call these).

Every change of a balance writes a ledger row in the same transaction as the cached balance; a deduction
(a negative grant) is one conditional UPDATE, like a reservation: it never takes money that is reserved.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from deepserve.billing.db import READONLY
from deepserve.billing.money import FREE, TokenPrices, dollars
from deepserve.billing.tables import Account, LedgerEntry, Price, utcnow

accounts_table = Account.__table__
ledger_table = LedgerEntry.__table__
prices_table = Price.__table__

CREDIT_KINDS = ("grant", "top_up", "adjust")  # what an operator may write; "charge" rows come from requests


@dataclass(slots=True)
class AccountInfo:
    id: int
    name: str
    balance: int  # nano-dollars; equals the sum of the account's ledger rows
    reserved: int  # held by requests in flight
    created_at: dt.datetime
    granted: int = 0  # the part of the balance that came from grants (spent first, as DeepSeek does)

    @property
    def available(self) -> int:
        return self.balance - self.reserved

    @property
    def topped_up(self) -> int:
        return self.balance - self.granted

    def to_json(self) -> dict:
        return {
            "id": self.id, "name": self.name, "currency": "USD",
            "balance": dollars(self.balance), "reserved": dollars(self.reserved),
            "available": dollars(self.available), "granted_balance": dollars(self.granted),
            "topped_up_balance": dollars(self.topped_up),
            "balance_nanodollars": self.balance, "reserved_nanodollars": self.reserved,
        }


def _read(engine: Engine) -> Connection:
    return engine.connect().execution_options(**{READONLY: True})


def ensure_account(engine: Engine, name: str) -> int:
    """The id of the account called `name`, created (with a zero balance) if there is none."""
    name = name.strip()
    if not name:
        raise ValueError("an account needs a name")
    with engine.begin() as conn:
        found = conn.execute(sa.select(accounts_table.c.id).where(accounts_table.c.name == name)).scalar()
        if found is not None:
            return found
        return conn.execute(
            sa.insert(accounts_table).values(name=name, balance=0, reserved=0, created_at=utcnow())
            .returning(accounts_table.c.id)
        ).scalar_one()


def _granted(conn: Connection, account_id: int, balance: int) -> int:
    sums = dict(
        conn.execute(
            sa.select(ledger_table.c.kind, sa.func.sum(ledger_table.c.amount))
            .where(ledger_table.c.account_id == account_id).group_by(ledger_table.c.kind)
        ).all()
    )
    spent = -int(sums.get("charge") or 0)
    return max(0, min(balance, int(sums.get("grant") or 0) - spent))


def get_account(engine: Engine, name_or_id: str | int) -> AccountInfo:
    """An account by name, or by id (an int, or "#3"); LookupError if there is none."""
    column = accounts_table.c.name
    value: str | int = name_or_id
    if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.startswith("#")):
        column, value = accounts_table.c.id, int(str(name_or_id).lstrip("#"))
    with _read(engine) as conn:
        row = conn.execute(sa.select(accounts_table).where(column == value)).one_or_none()
        if row is None:
            raise LookupError(f"no account {name_or_id!r} (`deepserve credits show` lists them)")
        return AccountInfo(row.id, row.name, row.balance, row.reserved, row.created_at,
                           _granted(conn, row.id, row.balance))


def list_accounts(engine: Engine) -> list[AccountInfo]:
    with _read(engine) as conn:
        rows = conn.execute(sa.select(accounts_table).order_by(accounts_table.c.id)).all()
        return [AccountInfo(r.id, r.name, r.balance, r.reserved, r.created_at, _granted(conn, r.id, r.balance))
                for r in rows]


def grant(engine: Engine, account_id: int, amount: int, *, kind: str = "grant", note: str | None = None) -> AccountInfo:
    """Add `amount` nano-dollars (negative: take them away, but never what is reserved or not there)."""
    if kind not in CREDIT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(CREDIT_KINDS)}, got {kind!r}")
    if amount == 0:
        raise ValueError("the amount must not be zero")
    with engine.begin() as conn:
        updated = conn.execute(
            sa.update(accounts_table)
            .where(accounts_table.c.id == account_id,
                   accounts_table.c.balance - accounts_table.c.reserved + amount >= 0)
            .values(balance=accounts_table.c.balance + amount)
        ).rowcount
        if updated != 1:
            exists = conn.execute(sa.select(accounts_table.c.id).where(accounts_table.c.id == account_id)).scalar()
            if exists is None:
                raise LookupError(f"no account with id {account_id}")
            raise ValueError(f"cannot take {dollars(-amount)} USD: more than the account's available balance")
        conn.execute(sa.insert(ledger_table).values(
            account_id=account_id, amount=amount, kind=kind, note=note, created_at=utcnow()))
    return get_account(engine, account_id)


def check_ledger(engine: Engine, account_id: int) -> tuple[int, int]:
    """(cached balance, sum of the ledger): equal unless something is broken."""
    with _read(engine) as conn:
        balance = conn.execute(
            sa.select(accounts_table.c.balance).where(accounts_table.c.id == account_id)).scalar_one()
        total = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(ledger_table.c.amount), 0))
            .where(ledger_table.c.account_id == account_id)).scalar_one()
    return balance, int(total)


# ---- prices ----------------------------------------------------------------------------------------
def set_price(engine: Engine, model_id: str, prices: TokenPrices) -> None:
    """The operator's price for `model_id` (the id the server serves it under), replacing the catalog's."""
    if min(prices.input, prices.cached_input, prices.output) < 0:
        raise ValueError("prices must not be negative")
    with engine.begin() as conn:
        conn.execute(sa.delete(prices_table).where(prices_table.c.model_id == model_id))
        conn.execute(sa.insert(prices_table).values(
            model_id=model_id, input=prices.input, cached_input=prices.cached_input, output=prices.output,
            updated_at=utcnow()))


def delete_price(engine: Engine, model_id: str) -> bool:
    with engine.begin() as conn:
        return conn.execute(sa.delete(prices_table).where(prices_table.c.model_id == model_id)).rowcount > 0


def price_overrides(engine: Engine) -> dict[str, TokenPrices]:
    with _read(engine) as conn:
        return {r.model_id: TokenPrices(r.input, r.cached_input, r.output)
                for r in conn.execute(sa.select(prices_table).order_by(prices_table.c.model_id))}


def resolve_price(
    overrides: dict[str, TokenPrices], names: tuple[str, ...], catalog_prices: TokenPrices | None
) -> tuple[TokenPrices, str]:
    """(price, source) of a model known by `names` (served id first, then its catalog id and aliases): the
    operator's price under the first of its names that has one, else the catalog's, else free. The one rule
    that charging (`price_of`) and every listing (admin API, `deepserve prices list`) follow."""
    for name in names:
        own = overrides.get(name)
        if own is not None:
            return own, "operator"
    if catalog_prices is not None:
        return catalog_prices, "catalog"
    return FREE, "free"


def price_of(conn: Connection, names: tuple[str, ...], catalog_prices: TokenPrices | None) -> TokenPrices:
    """The price a request for the model known by `names` is charged at (see `resolve_price`)."""
    rows = conn.execute(sa.select(prices_table).where(prices_table.c.model_id.in_(names)))
    overrides = {r.model_id: TokenPrices(r.input, r.cached_input, r.output) for r in rows}
    return resolve_price(overrides, names, catalog_prices)[0]
