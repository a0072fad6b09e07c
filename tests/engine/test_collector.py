"""The engine thread → event loop bridge: one crossing per step, and the wait for the loop to go idle."""

from __future__ import annotations

import asyncio
import threading

from deepserve.engine.collector import Postbox, RequestCollector
from deepserve.engine.types import FinishReason, TokenDelta


class CountingLoop:
    """A running loop's stand-in that counts thread crossings (each one wakes the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.crossings = 0

    def call_soon_threadsafe(self, callback, *args):
        self.crossings += 1
        return self.loop.call_soon_threadsafe(callback, *args)


async def drain(collector: RequestCollector) -> list[TokenDelta]:
    return [delta async for delta in collector]


def test_a_steps_deltas_cross_once_and_in_order():
    async def main():
        loop = CountingLoop(asyncio.get_running_loop())
        first, second = RequestCollector(loop), RequestCollector(loop)  # type: ignore[arg-type]
        postbox = Postbox()

        def engine_thread():
            for step in range(3):  # three steps, two sequences each
                postbox.put(first, TokenDelta(text=f"a{step}"))
                postbox.put(second, TokenDelta(text=f"b{step}"))
                postbox.flush()
            postbox.put(first, TokenDelta(finish_reason=FinishReason.STOP))
            postbox.put(second, TokenDelta(finish_reason=FinishReason.LENGTH))
            postbox.flush()
            postbox.flush()  # nothing left: no crossing

        thread = threading.Thread(target=engine_thread)
        thread.start()
        a, b = await asyncio.gather(drain(first), drain(second))
        thread.join()
        return loop.crossings, a, b

    crossings, a, b = asyncio.run(main())
    assert crossings == 4  # one per flushed step, not one per delta (8)
    assert [d.text for d in a] == ["a0", "a1", "a2", ""] and a[-1].finish_reason == FinishReason.STOP
    assert [d.text for d in b] == ["b0", "b1", "b2", ""] and b[-1].finish_reason == FinishReason.LENGTH


def test_flush_returns_once_the_loop_has_handled_the_deltas():
    """With wait_s, the next decode starts only after the tasks the deltas woke have done their work (here:
    consumers that need several more loop rounds before they record a token, as rendering and writing do)."""

    async def main():
        collectors = [RequestCollector(asyncio.get_running_loop()) for _ in range(2)]
        written: list[str] = []

        async def consumer(collector: RequestCollector):
            async for delta in collector:
                for _ in range(5):  # a chain of generators and queues between the collector and the socket
                    await asyncio.sleep(0)
                written.append(delta.text)

        seen_at_return: list[list[str]] = []

        def engine_thread():
            postbox = Postbox(wait_s=30.0)  # the bound is never reached: the loop goes idle first
            for step in range(3):
                for name, collector in zip("ab", collectors):
                    finish = FinishReason.STOP if step == 2 else None
                    postbox.put(collector, TokenDelta(text=f"{name}{step}", finish_reason=finish))
                postbox.flush()
                seen_at_return.append(sorted(written))

        tasks = [asyncio.create_task(consumer(c)) for c in collectors]
        await asyncio.sleep(0)
        await asyncio.to_thread(engine_thread)
        await asyncio.gather(*tasks)
        return seen_at_return

    assert asyncio.run(main()) == [["a0", "b0"], ["a0", "a1", "b0", "b1"], ["a0", "a1", "a2", "b0", "b1", "b2"]]


def stuck_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread, threading.Event]:
    """A loop running in its own thread, stuck in a callback until the returned event is set."""
    loop = asyncio.new_event_loop()
    blocked, release = threading.Event(), threading.Event()
    loop_thread = threading.Thread(target=loop.run_forever)
    loop_thread.start()
    loop.call_soon_threadsafe(lambda: (blocked.set(), release.wait()))
    assert blocked.wait(10)
    return loop, loop_thread, release


def stop_loop(loop: asyncio.AbstractEventLoop, loop_thread: threading.Thread, release: threading.Event) -> None:
    release.set()
    loop.call_soon_threadsafe(loop.stop)
    loop_thread.join()
    loop.close()


def test_a_single_requests_delta_is_handed_over_without_waiting():
    loop, loop_thread, release = stuck_loop()
    try:
        postbox = Postbox(wait_s=30.0)
        postbox.put(RequestCollector(loop), TokenDelta(text="x"))
        done = threading.Event()
        engine = threading.Thread(target=lambda: (postbox.flush(), done.set()))
        engine.start()
        assert done.wait(10)  # returned at once, although the loop has not run the delivery
        assert not release.is_set()
        engine.join()
    finally:
        stop_loop(loop, loop_thread, release)


def test_flush_waits_no_longer_than_its_bound_for_a_busy_loop():
    loop, loop_thread, release = stuck_loop()
    try:
        postbox = Postbox(wait_s=0.05)
        postbox.put(RequestCollector(loop), TokenDelta(text="x"))
        postbox.put(RequestCollector(loop), TokenDelta(text="y"))
        done = threading.Event()
        engine = threading.Thread(target=lambda: (postbox.flush(), done.set()))
        engine.start()
        assert done.wait(10)  # returned although the loop never ran the delivery
        assert not release.is_set()
        engine.join()
    finally:
        stop_loop(loop, loop_thread, release)


def test_a_closed_loop_is_skipped():
    loop = asyncio.new_event_loop()
    collector = RequestCollector(loop)
    loop.close()
    postbox = Postbox(wait_s=30.0)
    postbox.put(collector, TokenDelta(text="late"))
    postbox.flush()  # the server is shutting down: nothing to deliver to, no error, no wait
    assert collector._queue.qsize() == 0


class FakeSink:
    """A direct sink (api/direct.py) that records what it was given."""

    def __init__(self, *, can_arm: bool = True):
        self.armed = False
        self._can_arm = can_arm
        self.texts: list[str] = []

    def can_arm(self) -> bool:
        return self._can_arm

    def send_text(self, text: str, num_tokens: int) -> bool:
        self.texts.append(text)
        return True


def test_the_sink_is_armed_only_while_the_handler_waits_on_an_empty_queue():
    async def main():
        collector = RequestCollector(asyncio.get_running_loop())
        sink = collector.direct = FakeSink()
        waiting = asyncio.ensure_future(collector.next())
        await asyncio.sleep(0)  # let it start waiting (a scheduling step, not a timing)
        armed_while_waiting = sink.armed
        collector.num_posted += 1
        collector.put_in_loop(TokenDelta(text="a"))
        delta = await waiting
        return armed_while_waiting, sink.armed, delta, collector.num_taken

    armed_while_waiting, armed_after, delta, taken = asyncio.run(main())
    assert armed_while_waiting and not armed_after
    assert delta.text == "a" and taken == 1


def test_the_sink_is_not_armed_with_a_delta_queued_or_while_its_transport_holds_data():
    async def main():
        collector = RequestCollector(asyncio.get_running_loop())
        sink = collector.direct = FakeSink()
        collector.num_posted += 1
        collector.put_in_loop(TokenDelta(text="queued"))
        await collector.next()
        queued_armed = sink.armed
        busy = collector.direct = FakeSink(can_arm=False)
        waiting = asyncio.ensure_future(collector.next())
        await asyncio.sleep(0)
        busy_armed = busy.armed
        waiting.cancel()
        return queued_armed, busy_armed

    assert asyncio.run(main()) == (False, False)


def test_the_engine_writes_directly_only_plain_text_with_nothing_of_its_request_still_on_its_way():
    collector = RequestCollector(None)  # type: ignore[arg-type]
    sink = collector.direct = FakeSink()
    plain = TokenDelta(text="x", token_ids=[1])
    assert not collector.may_go_direct(plain)  # not armed: the handler is not waiting
    sink.armed = True
    assert collector.may_go_direct(plain)
    collector.num_posted = 1  # one posted that the handler has not taken: it would be overtaken
    assert not collector.may_go_direct(plain)
    collector.num_taken = 1
    for delta in (
        TokenDelta(text="x", logprobs=[object()]),  # type: ignore[list-item]
        TokenDelta(reasoning_text="hm"),
        TokenDelta(text="x", finish_reason=FinishReason.STOP),
        TokenDelta(error="boom"),
    ):
        assert not collector.may_go_direct(delta)
    assert collector.may_go_direct(TokenDelta(text="y", token_ids=[2]))
