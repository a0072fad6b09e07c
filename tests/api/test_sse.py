"""The event-stream response: events as they come, keep-alive comments only while idle, nothing after the end,
and the event generator closed however the response ends."""

from __future__ import annotations

import asyncio

import pytest

from deepserve.api.sse import EventStreamResponse
from tests.api.responses import bodies, never_receive, scope

KEEPALIVE = b": keep-alive\n\n"


async def two_events_with_a_gap(gap_ends: asyncio.Event):
    """`data: 1`, then nothing until `gap_ends` is set (the engine busy elsewhere), then `data: 2`."""
    yield b"data: 1\n\n"
    await gap_ends.wait()
    yield b"data: 2\n\n"


def test_idle_stream_gets_comments_between_events_and_ends_once():
    async def main() -> list[dict]:
        release = asyncio.Event()
        sent: list[dict] = []

        async def events():
            yield b"data: 1\n\n"
            await release.wait()  # the engine is busy elsewhere: nothing to send for a while
            yield "data: 2\n\n"  # a str is written as UTF-8

        async def send(message: dict) -> None:
            sent.append(message)
            if bodies(sent).count(KEEPALIVE) == 2:
                release.set()

        await EventStreamResponse(events())(scope(0.01), never_receive, send)
        return sent

    sent = asyncio.run(main())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache" and b"content-length" not in headers
    assert bodies(sent) == [b"data: 1\n\n", KEEPALIVE, KEEPALIVE, b"data: 2\n\n", b""]
    assert [m.get("more_body") for m in sent[1:]] == [True, True, True, True, False]


def test_busy_stream_gets_no_comments():
    """Events closer together than the interval: no comment at all (the timer is not re-armed per event)."""

    async def main() -> list[bytes]:
        sent: list[dict] = []

        async def events():
            for i in range(50):
                await asyncio.sleep(0)
                yield f"data: {i}\n\n".encode()

        async def send(message: dict) -> None:
            sent.append(message)

        await EventStreamResponse(events())(scope(3600), never_receive, send)
        return bodies(sent)

    assert asyncio.run(main()) == [f"data: {i}\n\n".encode() for i in range(50)] + [b""]


def test_a_comment_being_written_at_the_end_never_follows_the_final_message():
    """A keep-alive stuck in a slow write (client not reading) when the stream ends is cancelled first."""

    async def main() -> list[dict]:
        sent: list[dict] = []
        comment_started = asyncio.Event()
        unblock = asyncio.Event()

        async def send(message: dict) -> None:
            if message.get("body") == KEEPALIVE:
                comment_started.set()
                await unblock.wait()  # flow control: this write waits for the client
            sent.append(message)

        await EventStreamResponse(two_events_with_a_gap(comment_started))(scope(0.01), never_receive, send)
        unblock.set()
        await asyncio.sleep(0)  # let a stray comment task run, were there one
        return sent

    sent = asyncio.run(main())
    assert bodies(sent) == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1]["more_body"] is False


@pytest.mark.parametrize("ending", ["cancelled", "failed"])
def test_the_event_generator_is_closed_when_the_response_ends_early(ending: str):
    """A client gone (CancelOnDisconnect cancels the task) or a failure: the generator's `finally` runs (it aborts
    the request in the engine), and nothing is written after."""

    async def main() -> tuple[list[dict], bool]:
        closed = False
        sent: list[dict] = []
        first_sent = asyncio.Event()

        async def events():
            nonlocal closed
            try:
                yield b"data: 1\n\n"
                if ending == "failed":
                    raise RuntimeError("engine gone")
                await asyncio.Event().wait()
            finally:
                closed = True

        async def send(message: dict) -> None:
            sent.append(message)
            if message.get("body") == b"data: 1\n\n":
                first_sent.set()

        task = asyncio.create_task(EventStreamResponse(events())(scope(0.01), never_receive, send))
        await first_sent.wait()
        if ending == "cancelled":
            task.cancel()
        with pytest.raises(asyncio.CancelledError if ending == "cancelled" else RuntimeError):
            await task
        count = len(sent)
        await asyncio.sleep(0.05)  # two keep-alive intervals: a timer left armed would write now
        assert len(sent) == count
        return sent, closed

    sent, closed = asyncio.run(main())
    assert closed
    assert bodies(sent) == [b"data: 1\n\n"]


def test_the_timer_writes_only_after_a_whole_idle_interval():
    """The keep-alive rule itself, on the loop's clock: a write less than an interval ago means no comment, and
    the timer looks again an interval after that write."""
    from deepserve.api.sse import _Writer

    async def main() -> list[bytes]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        writer = _Writer(send, 60.0)
        loop = asyncio.get_running_loop()
        writer._last_write = loop.time() - 59.0  # written 59 s ago
        writer._check()
        assert writer._comment_task is None
        assert writer._timer is not None and 0.5 < writer._timer.when() - loop.time() <= 1.0  # due a minute after it
        writer._last_write = loop.time() - 61.0
        writer._check()
        assert writer._comment_task is not None
        await writer._comment_task
        await writer.stop_keepalive()
        return bodies(sent)

    assert asyncio.run(main()) == [KEEPALIVE]


def test_a_failed_comment_write_leaves_the_stream_to_report_it():
    """A keep-alive whose write fails (the connection broke) neither ends the stream by itself nor leaves an
    unretrieved task exception behind (asyncio would log it as an error)."""
    import gc

    async def main() -> tuple[list[bytes], list[dict]]:
        loop = asyncio.get_running_loop()
        errors: list[dict] = []
        gc.collect()  # earlier tests' garbage is not this test's to report
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        sent: list[dict] = []
        comment_failed = asyncio.Event()

        async def send(message: dict) -> None:
            if message.get("body") == KEEPALIVE:
                loop.call_soon(comment_failed.set)
                raise OSError("connection reset")
            sent.append(message)

        await EventStreamResponse(two_events_with_a_gap(comment_failed))(scope(0.01), never_receive, send)
        gc.collect()
        await asyncio.sleep(0)
        return bodies(sent), errors

    sent, errors = asyncio.run(main())
    assert sent == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert [e for e in errors if "connection reset" in repr(e.get("exception"))] == []


def test_a_write_stuck_on_a_slow_client_gets_no_comment_and_no_busy_timer():
    """While a write waits for a client that does not read, the timer writes nothing and looks again a whole
    interval later (not at once, over and over)."""
    from deepserve.api.sse import _Writer

    async def main() -> None:
        async def send(message: dict) -> None:
            raise AssertionError("nothing may be written")

        writer = _Writer(send, 60.0)
        loop = asyncio.get_running_loop()
        writer._busy = True
        writer._last_write = loop.time() - 600.0
        writer._check()
        assert writer._comment_task is None
        assert writer._timer is not None and writer._timer.when() - loop.time() > 59.0
        await writer.stop_keepalive()

    asyncio.run(main())


def test_background_tasks_run_after_the_stream_ends():
    """FastAPI hangs a route's BackgroundTasks on the response it returns; they run once the stream is complete,
    as with Starlette's own streaming response."""
    from starlette.background import BackgroundTask

    async def main() -> list[str]:
        happened: list[str] = []

        async def events():
            yield b"data: 1\n\n"

        async def send(message: dict) -> None:
            happened.append("final" if message.get("more_body") is False else message["type"])

        response = EventStreamResponse(events())
        response.background = BackgroundTask(happened.append, "background")
        await response(scope(3600), never_receive, send)
        return happened

    assert asyncio.run(main()) == ["http.response.start", "http.response.body", "final", "background"]
