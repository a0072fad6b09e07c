"""Graceful shutdown: on SIGTERM or SIGINT stop taking requests, let running ones finish, then exit 0.

1. The first signal starts the drain. The listening socket stays open, so a load balancer's health check
   sees `/v1/health/ready` (and `/health`) answer 503 and moves traffic away; every new request is refused
   with 503 in its caller's dialect and `Connection: close`. Liveness and `/metrics` still answer.
2. Requests that were running (streams included) go on to their end. When none is left, or after
   `--shutdown-timeout` seconds, uvicorn's shutdown runs: those still running are cancelled (their engine
   requests abort; billing charges what they computed and releases the rest), the engines close, billing
   waits for its last settles, and the process exits 0.
3. A second signal skips the wait (uvicorn's own graceful shutdown); a third exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from deepserve.errors import ServiceUnavailableError
from deepserve.observability import metrics

log = logging.getLogger(__name__)

# Still answered while draining: liveness and the metrics page (the last scrapes of this process).
PASS_THROUGH = frozenset({"/v1/health/live", "/metrics", "/v1/metrics"})
CANCEL_GRACE_S = 5.0  # after the timeout: how long cancelled requests get to abort and settle


class Drain:
    """The server's drain state and the requests it waits for."""

    def __init__(self) -> None:
        self.draining = False
        self.cancelled = False  # the timeout passed and cancel_running() cut what was left
        self._tasks: set[asyncio.Task] = set()
        self._deadline: float | None = None

    @property
    def num_running(self) -> int:
        return len(self._tasks)

    def begin(self, timeout_s: float) -> None:
        if not self.draining:
            self.draining = True
            self._deadline = time.monotonic() + timeout_s
            metrics.DRAINING.set(1)

    @property
    def finished(self) -> bool:
        """Nothing is left running, or the wait is over."""
        return not self._tasks or (self._deadline is not None and time.monotonic() >= self._deadline)

    async def cancel_running(self, grace_s: float = CANCEL_GRACE_S) -> None:
        """Cancel what is still running and give it `grace_s` to unwind (engine abort, billing settle)."""
        tasks = list(self._tasks)
        if not tasks:
            return
        log.warning("shutdown timeout: cancelling %d running request(s)", len(tasks))
        self.cancelled = True
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=grace_s)


class DrainGuard:
    """ASGI middleware: counts running requests and refuses new ones while the server drains."""

    def __init__(self, app: ASGIApp, drain: Drain, render_error):
        self.app = app
        self.drain = drain
        self.render_error = render_error  # (scope, DeepserveError) -> response in the caller's dialect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.drain.draining and path not in PASS_THROUGH:
            await self._refuse(path, scope, receive, send)
            return
        task = asyncio.current_task()
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.drain._tasks.add(task)
        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if not self.drain.cancelled:  # not ours (client gone, uvicorn's own shutdown): pass it on
                raise
            # Cut by the shutdown timeout. Its engine request was aborted and billing settled on the way out.
            # Before the response started the caller gets a 503; a stream just ends without its last event
            # and uvicorn closes the connection, so no client mistakes it for a complete answer.
            log.warning("%s %s cut by the shutdown timeout", scope["method"], scope["path"])
            if not started:
                await self._refuse(scope["path"], scope, receive, send)
        finally:
            self.drain._tasks.discard(task)

    async def _refuse(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {"Connection": "close", "Retry-After": "1"}  # retry elsewhere: this process is going away
        if path == "/v1/health/ready":
            response = JSONResponse({"object": "health.response", "message": "Service is shutting down."},
                                    status_code=503, headers=headers)
        elif path in ("/health", "/v1/health"):
            response = JSONResponse({"status": "shutting_down"}, status_code=503, headers=headers)
        else:
            error = ServiceUnavailableError("The server is shutting down. Retry the request on another replica.")
            error.headers.update(headers)
            response = self.render_error(scope, error)
        await response(scope, receive, send)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (see the module doc) and which exits 0 after it."""

    def __init__(self, config: uvicorn.Config, drain: Drain, timeout_s: float):
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = timeout_s
        self._drain_logged = False

    def handle_exit(self, sig: int, frame) -> None:
        # Runs in the signal handler: set flags only (no logging, no awaiting). uvicorn's own handler records
        # the signal and raises it again after shutdown, which would end the process with -SIGTERM, not 0.
        if not self.drain.draining and not self.should_exit:
            self.drain.begin(self.drain_timeout_s)
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if not self.drain.draining:
            return False
        if not self._drain_logged:
            self._drain_logged = True
            log.info("shutting down: refusing new requests, waiting up to %gs for %d running",
                     self.drain_timeout_s, self.drain.num_running)
        if not self.drain.finished:
            return False
        await self.drain.cancel_running()  # only those past the timeout remain
        log.info("drained: stopping the server")
        return True
