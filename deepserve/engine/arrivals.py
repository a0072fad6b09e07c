"""Requests on their way to an engine: arrived at the server, not yet submitted.

Why: an engine coming out of idle holds its first step for a few ms while the other requests of a burst are
still being parsed, templated and tokenized on the event loop (LlamaCppEngine._gather_burst), so that a burst
starts together. A lone request must not pay that wait, and only the HTTP side knows whether another request
is on its way. So the server counts every POST in when it arrives (api/arrivals.py's `CountArrivals`) and out
when it reaches an engine (`reached_engine()`, called by the engine's submit) or ends, whichever comes first;
the engine stops waiting as soon as none is left.

Measured on the 2-core VM, bundled model (`benchmarks/bench_ab.py before=<main> after=. --streams 1 8 --rounds 8`):
time to first token p50 at 1 stream 25 → 20 ms (the 4 ms wait gone), at 8 streams 125 → 117 ms (the wait
ends when the burst's last request is in, not gather_s after it); throughput level at both.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator


class Arrivals:
    """How many requests have arrived and not yet reached an engine. Counted on the event loop, read by engine
    threads (a plain int read)."""

    __slots__ = ("_pending", "_lock")

    def __init__(self) -> None:
        self._pending = 0
        self._lock = threading.Lock()  # servers with their own loops in other threads (tests) share the count

    @property
    def pending(self) -> int:
        return self._pending

    @contextlib.contextmanager
    def counted(self) -> Iterator[Arrival]:
        """Count one request in for the block: it is the current context's arrival (the request's own task and
        the tasks it starts), counted out by `reached_engine()` or at the end of the block."""
        with self._lock:
            self._pending += 1
        arrival = Arrival(self)
        token = _current.set(arrival)
        try:
            yield arrival
        finally:
            arrival.reached()
            _current.reset(token)

    def _leave(self) -> None:
        with self._lock:
            self._pending -= 1


class Arrival:
    """One request's place in the count: taken out once, by whichever comes first."""

    __slots__ = ("_arrivals", "_counted")

    def __init__(self, arrivals: Arrivals) -> None:
        self._arrivals = arrivals
        self._counted = True

    def reached(self) -> None:
        if self._counted:
            self._counted = False
            self._arrivals._leave()


_current: contextvars.ContextVar[Arrival | None] = contextvars.ContextVar("deepserve_arrival", default=None)

ARRIVALS = Arrivals()  # the server's: CountArrivals counts into it, the engines `deepserve serve` starts read it


def reached_engine() -> None:
    """The current request has reached an engine (its first submit; n choices count once). Outside a counted
    request (in-process use, tests) it does nothing."""
    arrival = _current.get()
    if arrival is not None:
        arrival.reached()
