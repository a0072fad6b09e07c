"""The async face of billing, used by `deepserve.serving.metered_generate`: reserve before the engine sees a
request, count what its streams deliver, settle once when the last of them closes.

Settling happens when the last choice's final delta passes through (before the route can send it: a
client never sees the end of an answer whose charge is not committed), else in the streams' `aclose()`,
which every route reaches (client gone, engine error): a `MeteredStream` is a class, not an async generator,
so closing one that never started still settles. The settle runs on the database threads under `asyncio.shield`: a cancelled request (the client
left) cannot cancel its own charge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from deepserve.api.auth import Principal
from deepserve.billing import reservations as sql
from deepserve.billing.db import Database
from deepserve.billing.money import TokenPrices
from deepserve.billing.reservations import Reservation, Usage
from deepserve.engine.types import FinishReason, GenerateRequest, StreamTap, TokenDelta, count_choices
from deepserve.errors import PermissionDeniedError

log = logging.getLogger(__name__)

SWEEP_EVERY_BEATS = 3  # release dead processes' reservations every 3 heartbeats (30 s)


def check_model_allowed(principal: Principal | None, model_id: str, names: tuple[str, ...]) -> None:
    """403 when the key is limited to some models and this is none of them (by id or any alias)."""
    if principal is None or principal.allowed_models is None:
        return
    if any(name in principal.allowed_models for name in names):
        return
    allowed = ", ".join(principal.allowed_models)
    raise PermissionDeniedError(
        f"This API key may not use the model `{model_id}`. It may use: {allowed}.", param="model",
        code="model_not_allowed",
    )


class Meter:
    """One per server process: its identity in the database (for crash release), its heartbeat, and
    `reserve()`, which starts the metering of one request."""

    def __init__(self, db: Database):
        self.db = db
        self.instance_id = uuid.uuid4().hex
        self.machine = sql.machine_id()
        self.pid = os.getpid()
        self._task: asyncio.Task | None = None
        self._jobs: set[asyncio.Future] = set()  # settles in flight: the loop keeps only weak references
        self._unsettled: list[tuple[Reservation, Usage, str]] = []  # settles the database refused (it was away)

    async def start(self) -> int:
        """Register this process and release what stopped ones left open; returns how many were released."""
        await self.db.run(sql.register_instance, self.instance_id, self.machine, self.pid)
        released = await self.db.run(sql.release_dead, self.instance_id, self.machine)
        self._task = asyncio.create_task(self._beat())
        return released

    async def _beat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(sql.HEARTBEAT_S)
            beats += 1
            try:
                if self._unsettled:
                    await self.retry_unsettled()
                await self.db.run(sql.heartbeat, self.instance_id, self.machine, self.pid)
                if beats % SWEEP_EVERY_BEATS == 0:
                    await self.db.run(sql.release_dead, self.instance_id, self.machine)
                    from deepserve.billing.idempotency import prune

                    await self.db.run(prune)
            except Exception:  # the database may be briefly away: try again at the next beat
                log.exception("billing heartbeat failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._jobs, return_exceptions=True)  # settles still running finish first
        if self._unsettled and await self.retry_unsettled():
            log.error("%d request(s) could not be charged: the database is away; their reservations are released "
                      "now or at the next start", len(self._unsettled))
        await self.db.run(sql.unregister_instance, self.instance_id)

    async def reserve(
        self,
        principal: Principal,
        *,
        model_names: tuple[str, ...],
        catalog_prices: TokenPrices | None,
        num_prompt_tokens: int,
        max_completion_tokens: int,
        min_completion_tokens: int | None = None,
    ) -> Reservation:
        return await self.db.run(
            sql.reserve, instance_id=self.instance_id, account_id=principal.account_id, key_id=principal.key_id,
            rpm_limit=principal.rpm_limit, tpm_limit=principal.tpm_limit, model_names=model_names,
            catalog_prices=catalog_prices, num_prompt_tokens=num_prompt_tokens,
            max_completion_tokens=max_completion_tokens, min_completion_tokens=min_completion_tokens,
            now_ms=int(time.time() * 1000),
        )

    async def settle(self, reservation: Reservation, usage: Usage, endpoint: str) -> int | None:
        """Settle off the event loop; a cancelled caller does not cancel it. None if the database failed
        (then the settle is tried again at every heartbeat, and the error is logged)."""
        return await self._shielded(self._settle_retrying(reservation, usage, endpoint))

    async def _shielded(self, work) -> Any:
        job = asyncio.ensure_future(work)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return await asyncio.shield(job)

    async def _settle_retrying(self, reservation: Reservation, usage: Usage, endpoint: str) -> int | None:
        for attempt in range(3):
            try:
                return await self.db.run(sql.settle, reservation, usage, endpoint=endpoint)
            except IntegrityError:  # its usage record exists: an earlier try committed (its answer was lost)
                return None
            except (OperationalError, InterfaceError):
                if attempt == 2:
                    # The database is away. Keep the usage and try again at every heartbeat: the reservation
                    # must not stay locked, nor the computed tokens go uncharged, for as long as this process lives.
                    log.exception("could not settle reservation %s; retrying at every heartbeat", reservation.id)
                    self._unsettled.append((reservation, usage, endpoint))
                    return None
                await asyncio.sleep(0.2 * (attempt + 1))
            except Exception:
                log.exception("could not settle reservation %s", reservation.id)
                return None
        return None

    async def retry_unsettled(self) -> int:
        """Settle what the database could not take earlier; returns how many still wait for it."""
        pending, self._unsettled = self._unsettled, []
        for reservation, usage, endpoint in pending:
            try:
                await self.db.run(sql.settle, reservation, usage, endpoint=endpoint)
            except IntegrityError:
                pass  # settled after all
            except (OperationalError, InterfaceError):
                self._unsettled.append((reservation, usage, endpoint))
            except Exception:
                log.exception("could not settle reservation %s", reservation.id)
        if pending:
            log.warning("settled %d delayed request(s); %d still wait for the database",
                        len(pending) - len(self._unsettled), len(self._unsettled))
        return len(self._unsettled)

    async def release(self, reservation: Reservation) -> int:
        return await self._shielded(self.db.run(sql.release, reservation))


class _Choice:
    __slots__ = ("num_delivered", "final")

    def __init__(self) -> None:
        self.num_delivered = 0  # generated tokens seen so far
        self.final: TokenDelta | None = None

    @classmethod
    def delivered(cls, num_tokens: int) -> _Choice:
        choice = cls()
        choice.num_delivered = num_tokens
        return choice


class Charge:
    """The metering of one HTTP request: one reservation, the streams of its prompts, one settle."""

    def __init__(
        self, meter: Meter, reservation: Reservation, prompt_lengths: list[int], n: int, endpoint: str,
        on_settled: Callable[[int], None],
    ):
        self._meter = meter
        self.reservation = reservation
        self._prompt_lengths = prompt_lengths
        self._choices = [[_Choice() for _ in range(n)] for _ in prompt_lengths]
        self._endpoint = endpoint
        self._on_settled = on_settled
        self._num_open = 0
        self._settled = False
        self._requests: list[list[GenerateRequest]] | None = None
        # A group whose one choice's plain text goes out past the stream (api/direct.py): its writer, which counts.
        self.direct: dict[int, Any] = {}

    def wrap(
        self, streams: list[AsyncIterator[tuple[int, TokenDelta]]], requests: list[list[GenerateRequest]] | None = None
    ) -> list[MeteredStream]:
        """`requests`: each prompt's n engine requests, to tell which a client left before they started."""
        self._num_open = len(streams)
        self._requests = requests
        return [MeteredStream(stream, self, group) for group, stream in enumerate(streams)]

    def _computed(self, group: int, index: int) -> bool:
        """Whether the engine computed any of this choice: a choice with no final delta may have been left in the
        queue by a client that went away, and one that failed may have failed before it started (its grammar);
        none of such a choice is charged."""
        final = self._choices[group][index].final
        if self._requests is None or (final is not None and final.finish_reason != FinishReason.ERROR):
            return True
        return self._requests[group][index].started

    def observe(self, group: int, index: int, delta: TokenDelta) -> None:
        choice = self._choices[group][index]
        choice.num_delivered += delta.num_tokens
        if delta.num_prompt_tokens and not self._prompt_lengths[group]:
            # An upstream engine tells its prompt count mid-stream (no local tokenizer knew it before).
            self._prompt_lengths[group] = delta.num_prompt_tokens
        if delta.finish_reason is not None:
            choice.final = delta

    def usage(self) -> Usage:
        """What was computed: the engine's final counts where a choice finished, else the prompt and the tokens
        delivered so far. A prompt counts once for its n choices, as the usage the client sees counts it."""
        total = Usage()
        statuses = set()
        for group, (num_prompt, choices) in enumerate(zip(self._prompt_lengths, self._choices)):
            direct = self.direct.get(group)
            if direct is not None and choices[0].final is None:
                choices = [_Choice.delivered(choices[0].num_delivered + direct.num_tokens)]
            computed = [choice for index, choice in enumerate(choices) if self._computed(group, index)]
            if computed:
                total.add(count_choices(num_prompt, computed))
            for choice in choices:
                final = choice.final
                if final is None or final.finish_reason == FinishReason.ABORT:
                    statuses.add("aborted")
                elif final.finish_reason == FinishReason.ERROR:
                    statuses.add("error")
        total.status = "error" if "error" in statuses else "aborted" if statuses else "ok"
        return total

    def all_finished(self) -> bool:
        """Every choice of every prompt has had its final delta: nothing more will be computed."""
        return all(choice.final is not None for choices in self._choices for choice in choices)

    async def stream_closed(self) -> None:
        self._num_open -= 1
        if self._num_open <= 0:
            await self.settle()

    async def settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        available = await self._meter.settle(self.reservation, self.usage(), self._endpoint)
        if available is not None:
            self._on_settled(available)

    async def release(self) -> None:
        """Nothing was computed (the engine refused the request): give the whole reservation back."""
        if self._settled:
            return
        self._settled = True
        self._on_settled(await self._meter.release(self.reservation))


class MeteredStream(StreamTap):
    """A `generate()` stream that reports what passes through it to its Charge and settles on close (at its
    end, on a failure, or when the client went away)."""

    __slots__ = ("_charge", "_group")

    def __init__(self, inner: AsyncIterator[tuple[int, TokenDelta]], charge: Charge, group: int):
        super().__init__(inner)
        self._charge = charge
        self._group = group

    async def _seen(self, index: int, delta: TokenDelta) -> None:
        self._charge.observe(self._group, index, delta)
        if delta.finish_reason is not None and self._charge.all_finished():
            # Settle before the last delta reaches the client: once a client has seen a request end, its
            # usage is committed, so a crash (kill -9) right after cannot lose a completed request's charge.
            await self._charge.settle()

    def _direct_attached(self, sink: Any) -> None:
        self._charge.direct[self._group] = sink  # its tokens were delivered too: usage() counts them

    async def _closed_hook(self) -> None:
        await self._charge.stream_closed()
