"""Plain text tokens written to the client's socket by the engine thread, past the event loop.

Why: at one stream on a machine whose cores all decode, each token's trip through the event loop (wake-up,
queue, the stream's taps, the route's rendering, nine ASGI `send` wrappers, uvicorn and h11) cost ~0.35 ms of
CPU and a GIL hand-over on the decode's critical path: about 4 % of a token's time, the gap to llama-server.
The engine thread already holds the text when it samples; it renders the chunk from a template that the route
made (`DirectText`), frames it as h11 would, and writes it to a duplicate of the connection's socket in one
non-blocking `write`. Everything that is not a plain text delta (the first and last chunks, logprobs, reasoning,
tool calls, errors, usage) still goes through the loop, in order (the hand-over protocol is in
engine/collector.py: RequestCollector.may_go_direct).

Safety:
- the socket is a `dup()`, closed under the writer's lock once the response is over, so the engine thread can
  never write into another connection that reuses the descriptor number;
- a write the kernel takes only partly (a client that does not read) hands the rest to the loop's transport
  and turns the writer off: from then on every chunk goes through uvicorn, which handles back-pressure;
- where the response cannot be written this way (no uvicorn h11 connection, TLS, HEAD, a body a middleware
  records for replay: Idempotency-Key), there is no writer and nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import Scope

CYCLE_KEY = "deepserve.http_cycle"  # uvicorn's RequestResponseCycle of the request (app.DeepserveApp puts it)
BODY_RECORDED_KEY = "deepserve.body_recorded"  # a middleware keeps the body: the socket must see it all pass
MARK = "\u2063deepserve-direct\u2063"  # stands for a delta's text in a rendered sample event


@dataclass(frozen=True, slots=True)
class DirectText:
    """What a streaming route allows to be written directly: `stream`'s plain text deltas, each rendered as
    `sample` with the JSON string MARK replaced by the text's JSON string."""

    stream: Any
    sample: bytes


class DirectWriter:
    """One response's direct writes. `send_text` runs on the engine thread; the rest on the event loop."""

    __slots__ = ("_fd", "_lock", "_closed", "_prefix", "_suffix", "_chunked", "_transport", "_loop", "armed",
                 "broken", "num_tokens", "first_token_at", "last_token_at", "last_write_at", "itl", "_rest")

    def __init__(self, fd: int, transport: asyncio.Transport, sample: bytes, *, chunked: bool):
        marker = json.dumps(MARK, ensure_ascii=False).encode()
        if sample.count(marker) != 1:
            raise ValueError("the sample event must hold MARK once")
        self._prefix, _, self._suffix = sample.partition(marker)
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False
        self._chunked = chunked
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self.armed = False  # set by the collector while the loop waits with everything before written
        self.broken = False  # a write did not go through whole: the loop writes from then on
        self.num_tokens = 0  # tokens delivered by direct writes (usage of a stream the client leaves)
        self.first_token_at: float | None = None  # time.perf_counter() of the first, for time to first token
        # The last token's time, whichever way it went (the stream's metrics tap sets it for the loop's).
        self.last_token_at: float | None = None
        self.last_write_at = 0.0  # loop time (monotonic) of the last direct write, for the keep-alive
        self.itl: Any = None  # an inter-token latency histogram (observability), observed per direct token
        self._rest = b""  # the end of a frame the kernel did not take, for the loop to write (flush_rest)

    def can_arm(self) -> bool:
        """Event loop: nothing of this response is waiting in the transport (it would be overtaken)."""
        return not (self.broken or self._closed or self._transport.is_closing()
                    or self._transport.get_write_buffer_size())

    def send_text(self, text: str, num_tokens: int) -> bool:
        """Engine thread: deliver one delta's text (nothing to write for an empty one). False: not delivered,
        the delta must go through the loop."""
        # Counted before the write: a client that hangs up right after reading it may be settled (billing) while
        # this thread is still returning from the write.
        self.num_tokens += num_tokens
        if text:
            body = self._prefix + json.dumps(text, ensure_ascii=False).encode() + self._suffix
            if not self._write(body, on_loop=False):
                self.num_tokens -= num_tokens
                return False
        if num_tokens:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
            if self.itl is not None and self.last_token_at is not None:
                self.itl.observe(now - self.last_token_at)
            self.last_token_at = now
        return True

    def send_body(self, body: bytes) -> bool:
        """Event loop: write `body` (a keep-alive comment) while the engine may write too. False: not written."""
        return self._write(body, on_loop=True)

    def _write(self, body: bytes, *, on_loop: bool) -> bool:
        frame = b"%x\r\n%s\r\n" % (len(body), body) if self._chunked else body
        with self._lock:
            if self._closed or self.broken:
                return False
            try:
                written = os.write(self._fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:  # the client is gone: the loop notices (disconnect) and aborts the request
                self.broken = True
                return False
            self.last_write_at = time.monotonic()
            partial = written < len(frame)
            if partial:
                # The rest goes to the transport ahead of any later write (flush_rest), and the deltas after it take
                # the loop's path, which waits for a slow client.
                self.broken = True
                self._rest = frame[written:]
        if partial and on_loop:
            self.flush_rest()
        elif partial:
            self._loop.call_soon_threadsafe(self.flush_rest)
        return True

    def flush_rest(self) -> None:
        """Event loop: hand the unwritten end of a partial write to the transport. Called before any write the loop
        makes to this response, and as soon as the loop runs after the partial write."""
        if self._rest:
            with self._lock:
                rest, self._rest = self._rest, b""
                closed = self._closed
            if rest and not closed:  # closed: the response was cut short (client gone), nothing more to write
                self._transport.write(rest)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.armed = False
                os.close(self._fd)


def open_direct(scope: Scope, direct: DirectText) -> DirectWriter | None:
    """A writer for this response (its start already sent), or None where direct writes cannot be made."""
    from uvicorn.protocols.http.h11_impl import RequestResponseCycle

    cycle = scope.get(CYCLE_KEY)
    if (not isinstance(cycle, RequestResponseCycle) or scope.get("method") != "POST"
            or scope.get(BODY_RECORDED_KEY) or cycle.disconnected or cycle.response_complete):
        return None
    writer_kind = type(getattr(cycle.conn, "_writer", None)).__name__  # h11's framing of this response's body
    if writer_kind not in ("ChunkedWriter", "Http10Writer"):
        return None
    sock = cycle.transport.get_extra_info("socket")
    if sock is None or cycle.transport.get_extra_info("ssl_object") is not None:
        return None  # TLS (uvicorn run with --ssl-*): the socket carries records only the transport can write
    fd = os.dup(sock.fileno())
    try:
        return DirectWriter(fd, cycle.transport, direct.sample, chunked=writer_kind == "ChunkedWriter")
    except BaseException:
        os.close(fd)
        raise

