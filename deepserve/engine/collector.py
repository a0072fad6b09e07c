"""Per-step bridge from the engine thread to asyncio.

The engine thread gathers a step's deltas in a `Postbox` and flushes it once per step; the HTTP handlers
iterate their request's collector. `call_soon_threadsafe` is the only thread crossing, so the asyncio side
needs no locks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Protocol

from deepserve.engine.types import TokenDelta

MAX_IDLE_HOPS = 64  # rounds of the loop's ready queue a flush waits through at most (with wait_s, its bound)


class DirectSink(Protocol):
    """Where the engine thread may deliver a plain text delta itself (api/direct.py: DirectWriter)."""

    armed: bool

    def can_arm(self) -> bool: ...

    def send_text(self, text: str, num_tokens: int) -> bool: ...


class RequestCollector:
    """One request's deltas, from the engine thread to the request's handler.

    With a `direct` sink, the engine thread delivers plain text deltas there instead, but only while everything
    it posted before has been taken and written: the sink is armed only while the handler waits here on an
    empty queue with nothing left in its transport, and the engine also checks that it has posted no delta the
    handler has not taken yet (`num_posted` == `num_taken`: one still on its way through the loop). So the
    client gets every delta in order, whichever way each went."""

    __slots__ = ("loop", "_queue", "direct", "num_posted", "num_taken")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self.direct: DirectSink | None = None
        self.num_posted = 0  # engine thread: deltas handed to the Postbox for this request
        self.num_taken = 0  # event loop: deltas the handler has taken

    def put_in_loop(self, delta: TokenDelta) -> None:
        """Called on the event loop's thread."""
        self._queue.put_nowait(delta)

    async def next(self) -> TokenDelta:
        direct = self.direct
        if direct is None:
            delta = await self._queue.get()
        else:
            if self._queue.empty() and direct.can_arm():
                direct.armed = True
            try:
                delta = await self._queue.get()
            finally:
                direct.armed = False  # before num_taken counts it: the engine sees the delta as still on its way
        self.num_taken += 1
        return delta

    def may_go_direct(self, delta: TokenDelta) -> bool:
        """Engine thread: whether this delta may be delivered through the sink (`direct.send_text`) rather than
        posted (Postbox.put): plain text, with the handler waiting and nothing of the request on its way."""
        direct = self.direct
        return not (direct is None or not direct.armed or self.num_posted != self.num_taken or delta.logprobs
                    or delta.prompt_logprobs or delta.reasoning_text or delta.tool_calls or delta.error is not None
                    or delta.finish_reason is not None)

    async def __aiter__(self) -> AsyncIterator[TokenDelta]:
        while True:
            delta = await self.next()
            yield delta
            if delta.finish_reason is not None:
                return


class Postbox:
    """The deltas the engine thread produced in one step, handed to each event loop in one call; then (with
    `wait_s`) the engine thread waits, at most `wait_s`, until the loop has nothing left to run, i.e. has
    rendered and written those tokens to their clients, before it starts the next llama_decode.

    Why: on a machine whose cores all decode, the HTTP work of a step (8 streams: ~2 ms of Python and socket
    writes) used to run during the next decode, preempting one of llama.cpp's threads, which stalls the
    others at the next barrier. Measured on the 2-core VM at 8 streams: inter-token latency p50 120 ms with
    the old per-delta hand-off, 107 ms with this one (llama-server: 108 ms). Also one self-pipe write per
    step instead of one per delta.

    A step with one request's delta does not wait: its HTTP work is one event (~0.45 ms), which costs the
    decode it overlaps about as much as waiting for it would, and the wait itself (waking the loop, then the
    loop waking this thread) is ~0.2 ms a token on the 2-core VM. Measured at 1 stream (benchmarks/bench_ab.py,
    30 interleaved rounds, twice): 0.97x against 0.96x and 0.96x against 0.95x of llama-server."""

    __slots__ = ("_items", "_idle", "wait_s")

    def __init__(self, wait_s: float = 0.0) -> None:
        self._items: list[tuple[RequestCollector, TokenDelta]] = []
        self._idle = threading.Event()
        self.wait_s = wait_s

    def put(self, collector: RequestCollector, delta: TokenDelta) -> None:
        collector.num_posted += 1
        self._items.append((collector, delta))

    def flush(self) -> None:
        """Hand the gathered deltas over (in the order they were put); called on the engine thread."""
        if not self._items:
            return
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestCollector, TokenDelta]]] = {}
        for collector, delta in items:
            by_loop.setdefault(collector.loop, []).append((collector, delta))
        # One server loop (tests may run several: no wait), and more than one request's delta (see above).
        wait = self.wait_s > 0 and len(by_loop) == 1 and len(items) > 1
        self._idle.clear()
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch, self._idle if wait else None)
            except RuntimeError:  # event loop already closed (server shutting down)
                wait = False
        if wait:
            self._idle.wait(self.wait_s)


def _deliver(batch: list[tuple[RequestCollector, TokenDelta]], idle: threading.Event | None) -> None:
    for collector, delta in batch:
        collector.put_in_loop(delta)
    if idle is not None:
        loop = asyncio.get_running_loop()
        loop.call_soon(_signal_when_idle, loop, idle, 0)


def _signal_when_idle(loop: asyncio.AbstractEventLoop, idle: threading.Event, hops: int) -> None:
    """Set `idle` once the loop's ready queue holds nothing but this callback: the tasks the deltas woke
    have run to their next real wait (a socket write in asyncio is synchronous). A loop without a visible
    ready queue (not asyncio's own) is taken as idle at once."""
    ready = getattr(loop, "_ready", None)
    if ready and hops < MAX_IDLE_HOPS:
        loop.call_soon(_signal_when_idle, loop, idle, hops + 1)
    else:
        idle.set()
