"""The hot path in SQL: reserve a request's worst case, settle what it used, release what a dead process held.

    reserve: [rate limit check] + UPDATE accounts SET reserved = reserved + :amount
             WHERE id = :account AND balance - reserved >= :amount          (one statement: no overspend)
             + INSERT reservation                                            (one transaction)
    settle:  DELETE reservation; UPDATE accounts SET balance = balance - :cost, reserved = reserved - :amount;
             INSERT usage record; INSERT ledger row (-cost)                  (one transaction)

A reservation names the server process (instance) that holds it. A process that dies (SIGKILL, power cut)
leaves its reservations behind; `release_dead` (at every start, then periodically) gives them back: a process
on this machine whose pid is gone is dead at once, one elsewhere when its heartbeat is stale.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from deepserve.billing import ratelimit
from deepserve.billing.accounts import price_of
from deepserve.billing.db import READONLY
from deepserve.billing.money import TokenPrices, affordable_completion, cost, dollars, worst_case_cost
from deepserve.billing.tables import (
    Account,
    IdempotencyRecord,
    Instance,
    LedgerEntry,
    Reservation as ReservationRow,
    UsageRecord,
    utcnow,
)
from deepserve.engine.types import TokenCounts
from deepserve.errors import InsufficientBalanceError

log = logging.getLogger(__name__)

accounts = Account.__table__
reservations = ReservationRow.__table__
usage_records = UsageRecord.__table__
ledger = LedgerEntry.__table__
instances = Instance.__table__
idempotency = IdempotencyRecord.__table__

NO_RETRY_HEADER = "x-should-retry"  # the Stainless SDKs' own header: "false" stops their automatic retries
HEARTBEAT_S = 10
STALE_AFTER_S = 60  # a process elsewhere that has not beaten for this long is taken for dead


@dataclass(slots=True)
class Reservation:
    id: str
    account_id: int
    key_id: int | None
    model_id: str
    amount: int
    prices: TokenPrices
    num_prompt_tokens: int
    max_completion_tokens: int
    tpm_limit: int | None = None  # tokens taken from the key's bucket: num_prompt + max_completion
    available_after: int = 0  # the account's balance less reservations, just after this one
    rate_headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Usage(TokenCounts):
    status: str = "ok"  # ok | aborted | error


def machine_id() -> str:
    """This machine and pid namespace: pids are only comparable between processes that share both."""
    boot_id = ""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = ""
    return f"{socket.gethostname()}/{boot_id}/{pid_ns}"[:300]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: dead for us
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ---- reserve / settle / release --------------------------------------------------------------------
def reserve(
    engine: Engine,
    *,
    instance_id: str,
    account_id: int,
    key_id: int | None,
    rpm_limit: int | None,
    tpm_limit: int | None,
    model_names: tuple[str, ...],
    catalog_prices: TokenPrices | None,
    num_prompt_tokens: int,
    max_completion_tokens: int,
    now_ms: int,
    min_completion_tokens: int | None = None,
) -> Reservation:
    """Hold the request's worst-case cost, or raise InsufficientBalanceError / RateLimitError having changed
    nothing. `model_names`: the served id first, then the catalog's names, for the operator's price. With
    `min_completion_tokens`, fewer completion tokens than `max_completion_tokens` (not fewer than that) are
    reserved when the balance does not cover them all: the reservation's max_completion_tokens says how many."""
    with engine.begin() as conn:
        prices = price_of(conn, model_names, catalog_prices)
        amount = worst_case_cost(prices, num_prompt=num_prompt_tokens, max_completion=max_completion_tokens)
        if min_completion_tokens is not None:
            available = conn.execute(
                sa.select(accounts.c.balance - accounts.c.reserved).where(accounts.c.id == account_id)
            ).scalar_one()
            if amount > available:
                affordable = affordable_completion(prices, num_prompt=num_prompt_tokens, available=available)
                if affordable is not None and affordable >= min_completion_tokens:
                    max_completion_tokens = min(max_completion_tokens, affordable)
                    amount = worst_case_cost(prices, num_prompt=num_prompt_tokens,
                                             max_completion=max_completion_tokens)
        rate_headers: dict[str, str] = {}
        if key_id is not None and (rpm_limit or tpm_limit):
            state = ratelimit.admit(conn, key_id, rpm_limit, tpm_limit, num_prompt_tokens + max_completion_tokens,
                                    now_ms)
            rate_headers = state.headers()
        row = conn.execute(
            sa.update(accounts)
            .where(accounts.c.id == account_id, accounts.c.balance - accounts.c.reserved >= amount)
            .values(reserved=accounts.c.reserved + amount)
            .returning(accounts.c.balance, accounts.c.reserved)
        ).one_or_none()
        if row is None:
            available = conn.execute(
                sa.select(accounts.c.balance - accounts.c.reserved).where(accounts.c.id == account_id)
            ).scalar_one()
            error = InsufficientBalanceError(
                f"Insufficient Balance: this request may cost up to {dollars(amount)} USD ({num_prompt_tokens} prompt "
                f"tokens and up to {max_completion_tokens} completion tokens), and the account has "
                f"{dollars(available)} USD available. Add credits, or lower max_tokens."
            )
            error.available_nanodollars = available  # type: ignore[attr-defined]  (x-remaining-credits)
            # Retrying cannot help until credits are added. Workers AI answers this with a 429, which the
            # Stainless SDKs (openai, cloudflare) would retry at once; this header, which they read, says not to.
            error.headers[NO_RETRY_HEADER] = "false"
            raise error  # rolls back the rate-limit take too
        reservation_id = uuid.uuid4().hex
        conn.execute(sa.insert(reservations).values(
            id=reservation_id, account_id=account_id, key_id=key_id, instance_id=instance_id,
            model_id=model_names[0], amount=amount, created_at=utcnow()))
    return Reservation(
        id=reservation_id, account_id=account_id, key_id=key_id, model_id=model_names[0], amount=amount,
        prices=prices, num_prompt_tokens=num_prompt_tokens, max_completion_tokens=max_completion_tokens,
        tpm_limit=tpm_limit, available_after=row.balance - row.reserved, rate_headers=rate_headers,
    )


def settle(engine: Engine, reservation: Reservation, usage: Usage, *, endpoint: str) -> int:
    """Charge what the request used, give back the rest of its reservation, write the usage record and its
    ledger row: one transaction. Returns the account's available balance afterwards.

    The reservation is the worst case for a local engine (its prompt is counted before it runs), but for an
    upstream it rests on a bound of the prompt (the upstream's template is not seen here): a prompt beyond it is
    charged from what the account has free besides, never below zero, and what even that cannot cover is logged.
    Completion tokens are charged up to the max_tokens reserved for, never beyond (what the client asked for)."""
    full = cost(reservation.prices, num_prompt=usage.num_prompt, num_cached=usage.num_cached,
                num_completion=min(usage.num_completion, reservation.max_completion_tokens))
    charge = full
    now = utcnow()
    with engine.begin() as conn:
        held = conn.execute(sa.delete(reservations).where(reservations.c.id == reservation.id)).rowcount == 1
        if held:
            if charge > reservation.amount:
                free = conn.execute(  # locked: no reservation can take it meanwhile
                    sa.select(accounts.c.balance - accounts.c.reserved)
                    .where(accounts.c.id == reservation.account_id).with_for_update()
                ).scalar_one()
                charge = min(charge, reservation.amount + max(0, free))
            row = conn.execute(
                sa.update(accounts).where(accounts.c.id == reservation.account_id)
                .values(balance=accounts.c.balance - charge, reserved=accounts.c.reserved - reservation.amount)
                .returning(accounts.c.balance, accounts.c.reserved)
            ).one()
        else:
            # Released meanwhile by a process that took this one for dead: charge only what is still free.
            log.warning("reservation %s was released before it settled; charging what the account has free",
                        reservation.id)
            available = conn.execute(
                sa.select(accounts.c.balance - accounts.c.reserved).where(accounts.c.id == reservation.account_id)
                .with_for_update()
            ).scalar_one()
            charge = max(0, min(charge, available))
            row = conn.execute(
                sa.update(accounts).where(accounts.c.id == reservation.account_id)
                .values(balance=accounts.c.balance - charge)
                .returning(accounts.c.balance, accounts.c.reserved)
            ).one()
        if charge < full:
            log.warning("request %s used %d nano-dollars, more than the account could pay: %d charged",
                        reservation.id, full, charge)
        usage_id = conn.execute(sa.insert(usage_records).values(
            request_id=reservation.id, account_id=reservation.account_id, key_id=reservation.key_id,
            model_id=reservation.model_id, endpoint=endpoint[:300], status=usage.status,
            num_prompt_tokens=usage.num_prompt, num_cached_tokens=usage.num_cached,
            num_completion_tokens=usage.num_completion, num_reasoning_tokens=usage.num_reasoning,
            cost=charge, reserved=reservation.amount, day=now.date().isoformat(), created_at=now,
        ).returning(usage_records.c.id)).scalar_one()
        if charge:
            conn.execute(sa.insert(ledger).values(
                account_id=reservation.account_id, amount=-charge, kind="charge", usage_id=usage_id, created_at=now))
        if reservation.tpm_limit and reservation.key_id is not None:
            used = usage.num_prompt + usage.num_completion
            ratelimit.refund_tokens(conn, reservation.key_id, reservation.tpm_limit,
                                    reservation.num_prompt_tokens + reservation.max_completion_tokens - used)
    return row.balance - row.reserved


def release(engine: Engine, reservation: Reservation) -> int:
    """Give a reservation back unused (the engine refused the request before computing anything)."""
    with engine.begin() as conn:
        _release_row(conn, reservation.id, reservation.account_id, reservation.amount)
        if reservation.tpm_limit and reservation.key_id is not None:
            ratelimit.refund_tokens(conn, reservation.key_id, reservation.tpm_limit,
                                    reservation.num_prompt_tokens + reservation.max_completion_tokens)
        return conn.execute(
            sa.select(accounts.c.balance - accounts.c.reserved).where(accounts.c.id == reservation.account_id)
        ).scalar_one()


def _release_row(conn: Connection, reservation_id: str, account_id: int, amount: int) -> bool:
    # Delete first: of two processes releasing one reservation, only the one that deleted it gives money back.
    if conn.execute(sa.delete(reservations).where(reservations.c.id == reservation_id)).rowcount != 1:
        return False
    conn.execute(sa.update(accounts).where(accounts.c.id == account_id)
                 .values(reserved=accounts.c.reserved - amount))
    return True


# ---- server processes ------------------------------------------------------------------------------
def register_instance(engine: Engine, instance_id: str, machine: str, pid: int) -> None:
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.insert(instances).values(id=instance_id, machine=machine, pid=pid, started_at=now,
                                                 heartbeat_at=now))


def heartbeat(engine: Engine, instance_id: str, machine: str, pid: int) -> None:
    with engine.begin() as conn:
        beat = conn.execute(
            sa.update(instances).where(instances.c.id == instance_id).values(heartbeat_at=utcnow())
        ).rowcount
        if not beat:  # taken for dead by another process and removed: come back
            now = utcnow()
            conn.execute(sa.insert(instances).values(id=instance_id, machine=machine, pid=pid, started_at=now,
                                                     heartbeat_at=now))


def unregister_instance(engine: Engine, instance_id: str) -> int:
    """At a clean shutdown: release what is still held (nothing, normally) and forget this process."""
    return _release_instances(engine, [instance_id])


def release_dead(engine: Engine, instance_id: str, machine: str, *, stale_after_s: int = STALE_AFTER_S) -> int:
    """Release the reservations (and in-flight idempotency claims) of server processes that are gone; returns
    how many reservations were released."""
    stale_before = utcnow() - dt.timedelta(seconds=stale_after_s)
    with engine.connect().execution_options(**{READONLY: True}) as conn:
        rows = conn.execute(sa.select(instances)).all()
        holders = {r[0] for r in conn.execute(sa.select(reservations.c.instance_id).distinct())}
        holders |= {r[0] for r in conn.execute(
            sa.select(idempotency.c.instance_id).where(idempotency.c.state == "in_flight").distinct())}
    known = {r.id for r in rows}
    dead = [
        r.id for r in rows
        if r.id != instance_id and (
            r.heartbeat_at < stale_before
            or (r.machine == machine and (r.pid == os.getpid() or not pid_alive(r.pid)))
        )
    ]
    orphans = [h for h in holders if h not in known and h != instance_id]
    if not dead and not orphans:
        return 0
    return _release_instances(engine, dead + orphans)


def _release_instances(engine: Engine, instance_ids: list[str]) -> int:
    released = 0
    with engine.begin() as conn:
        held = conn.execute(
            sa.select(reservations.c.id, reservations.c.account_id, reservations.c.amount)
            .where(reservations.c.instance_id.in_(instance_ids))
        ).all()
        for r in held:
            released += _release_row(conn, r.id, r.account_id, r.amount)
        conn.execute(sa.delete(idempotency).where(idempotency.c.instance_id.in_(instance_ids),
                                                  idempotency.c.state == "in_flight"))
        conn.execute(sa.delete(instances).where(instances.c.id.in_(instance_ids)))
    if released:
        log.warning("released %d reservation(s) left open by %d stopped server process(es)", released,
                    len(instance_ids))
    return released


def open_reservations(engine: Engine) -> list[tuple[str, int, int]]:
    """(id, account id, amount) of every open reservation: for operators and tests."""
    with engine.connect().execution_options(**{READONLY: True}) as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(reservations.c.id, reservations.c.account_id, reservations.c.amount))]
