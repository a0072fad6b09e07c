"""RemoteEngine's failure semantics and connection handling against scripted upstreams, in addition to the
real-process tests in test_gateway.py: the cases a real deepserve upstream cannot be made to produce on demand
(a 500, a 429, a stream that breaks after N chunks, a stream without usage, an upstream that never answers).

Each scripted upstream is a real HTTP/1.1 server on 127.0.0.1 (asyncio streams, in the test's own event
loop): keep-alive, SSE answers in chunked encoding with the terminating chunk written on its own after the
last event (as uvicorn does), and it counts the TCP connections it accepted and the ones the client closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from deepserve.engine.remote import RemoteEngine, RemoteModelSpec
from deepserve.engine.remote import engine as remote_engine
from deepserve.engine.types import FinishReason, GenerateRequest, ReasoningParams, SamplingParams
from deepserve.errors import InvalidRequestError, QueueFullError, ServiceUnavailableError
from deepserve.serving import read_ahead

KEY = "sk-up-secret"


def sse(*payloads: dict | str, end: str = "\n") -> list[bytes]:
    return [f"data: {p if isinstance(p, str) else json.dumps(p)}{end}{end}".encode() for p in payloads]


def content(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def good(end: str = "\n") -> list[bytes]:
    return sse(content("Hello"), content(" world"),
               {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}, "[DONE]", end=end)


GOOD = good()


@dataclass
class Status:
    """A plain answer: this status and JSON body (Content-Length, keep-alive)."""

    code: int
    body: dict


@dataclass
class Broken:
    """Sends its events, then drops the connection the way a killed upstream's does."""

    chunks: list[bytes]


@dataclass
class Hold:
    """Sends its events, then holds the stream open until the client closes the connection."""

    chunks: list[bytes]


HANG = "hang"  # takes the request and never answers
REFUSED = "refused"  # nothing listens on its port


@dataclass
class Upstream:
    """One scripted upstream: answers every POST with its script, GET /health with `health`."""

    name: str
    script: object
    log: list[str]  # the names of the upstreams that got a request, in order (shared)
    health: int = 200
    requests: list[tuple[dict[str, str], dict]] = field(default_factory=list)  # (headers, body)
    connections: int = 0  # TCP connections accepted
    hangups: int = 0  # connections the client closed while a request was still being answered
    server: asyncio.Server | None = None
    handlers: set[asyncio.Task] = field(default_factory=set)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.handlers.add(asyncio.current_task())
        try:
            while True:  # one request after another on this connection (keep-alive)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed an idle connection
                request_line, *lines = head.decode().split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = dict((k.strip().lower(), v.strip()) for k, v in (x.split(":", 1) for x in lines if x))
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if method == "GET" and target == "/health":
                    await self._plain(writer, self.health, {"status": "ok"})
                    continue
                self.log.append(self.name)
                self.requests.append((headers, json.loads(body)))
                if not await self._answer(reader, writer):
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answers the script; False when the connection is done."""
        script = self.script
        if isinstance(script, Status):
            await self._plain(writer, script.code, script.body)
            return True
        if script == HANG:
            await reader.read()  # until the client gives up and closes
            self.hangups += 1
            return False
        chunks = script.chunks if isinstance(script, (Broken, Hold)) else script
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for chunk in chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        if isinstance(script, Broken):
            writer.transport.abort()
            return False
        if isinstance(script, Hold):
            await reader.read()
            self.hangups += 1
            return False
        await asyncio.sleep(0.005)  # the terminating chunk on its own, after [DONE]
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    async def _plain(writer: asyncio.StreamWriter, code: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (code, len(raw), raw))
        await writer.drain()


@dataclass
class Scripted:
    engine: RemoteEngine
    upstreams: dict[str, Upstream]
    urls: dict[str, str]
    hosts: list[str]  # the upstreams that got a request, in order


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@contextlib.asynccontextmanager
async def scripted(scripts: dict[str, object], **spec) -> AsyncIterator[Scripted]:
    """Upstreams named and scripted as given (in order), and an engine in front of them."""
    hosts: list[str] = []
    upstreams = {name: Upstream(name, script, hosts) for name, script in scripts.items() if script != REFUSED}
    urls = {name: await upstreams[name].start() if name in upstreams else dead_url() for name in scripts}
    config = RemoteModelSpec.model_validate({
        "id": "remote", "context_window": 4096, "health_interval_s": 0,
        "upstreams": [{"url": urls[name], "api_key": KEY, "name": name} for name in scripts], **spec})
    engine = RemoteEngine(config)
    try:
        yield Scripted(engine, upstreams, urls, hosts)
    finally:
        await engine.aclose()
        for upstream in upstreams.values():
            await upstream.stop()


def chat(e: RemoteEngine) -> GenerateRequest:
    prompt = e.chat_prompt([{"role": "user", "content": "hi"}])
    return GenerateRequest(prompt, SamplingParams(max_tokens=16, reasoning=ReasoningParams()))


async def drain(e: RemoteEngine, request: GenerateRequest) -> list:
    stream = e.submit(request)
    return [d async for d in stream]


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)  # poll interval


def test_the_first_read_fails_over_past_refused_and_failing_upstreams():
    async def scenario():
        async with scripted({"a": REFUSED, "b": Status(500, {"error": "boom"}), "c": GOOD}) as s:
            deltas = await drain(s.engine, chat(s.engine))
            assert s.hosts == ["b", "c"] and s.engine.num_failovers == 2
            assert "".join(d.text for d in deltas) == "Hello world"
            final = deltas[-1]
            assert (final.finish_reason, final.num_prompt_tokens, final.num_generated_tokens) == (
                FinishReason.STOP, 7, 2)
            headers, body = s.upstreams["c"].requests[-1]
            assert body["stream"] is True and body["stream_options"]["include_usage"] is True
            assert headers["content-type"] == "application/json"
            assert [u["num_failures"] for u in s.engine.stats()["upstreams"]] == [1, 1, 0]  # a refused, b 500

    asyncio.run(scenario())


def test_no_upstream_left_raises_before_anything_is_streamed():
    async def scenario():
        async with scripted({"a": REFUSED, "b": HANG}, timeouts={"connect_s": 5, "read_s": 0.3}) as s:
            with pytest.raises(ServiceUnavailableError) as caught:
                await read_ahead(s.engine.submit(chat(s.engine)))
            message = caught.value.message
            assert "2 tried of 2" in message and KEY not in message and "127.0.0.1" not in message
            assert "upstream #1: connection refused" in message and "upstream #2: timed out" in message
            assert caught.value.headers["Retry-After"] == "1"  # health_interval_s 0 here: probe-less, retry soon
            await until(lambda: s.upstreams["b"].hangups == 1)  # the timed-out try closed its connection

    asyncio.run(scenario())


def test_every_upstream_busy_is_a_429_and_does_not_count_as_a_failure():
    busy = Status(429, {"error": {"message": "queue full"}})

    async def scenario():
        async with scripted({"a": busy, "b": busy}, eject_after=1) as s:
            with pytest.raises(QueueFullError):
                await drain(s.engine, chat(s.engine))
            assert s.hosts == ["a", "b"]
            assert [u["num_failures"] for u in s.engine.stats()["upstreams"]] == [0, 0]

    asyncio.run(scenario())


def test_an_upstream_400_is_the_requests_fault_with_the_upstreams_message_and_no_failover():
    bad = Status(400, {"error": {"message": "This model's maximum context length is 4096 tokens."}})

    async def scenario():
        async with scripted({"a": bad, "b": GOOD}) as s:
            with pytest.raises(InvalidRequestError, match="maximum context length is 4096"):
                await drain(s.engine, chat(s.engine))
            assert s.hosts == ["a"] and s.engine.stats()["upstreams"][0]["num_failures"] == 0

    asyncio.run(scenario())


def test_a_break_after_output_ends_with_an_error_delta_counting_what_was_delivered():
    async def scenario():
        async with scripted({"a": Broken(sse(content("Hel"), content("lo"))), "b": GOOD}) as s:
            deltas = await drain(s.engine, chat(s.engine))
            assert s.hosts == ["a"]  # no failover once output has left
            assert "".join(d.text for d in deltas) == "Hello"
            final = deltas[-1]
            assert final.finish_reason == FinishReason.ERROR and "mid-stream" in final.error
            assert (final.num_generated_tokens, sum(d.num_tokens for d in deltas)) == (2, 2)
            assert s.engine.num_broken_streams == 1

    asyncio.run(scenario())


def test_a_break_before_output_fails_over_unseen():
    role_only = sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})

    async def scenario():
        async with scripted({"a": Broken(role_only), "b": GOOD}) as s:
            deltas = await drain(s.engine, chat(s.engine))
            assert s.hosts == ["a", "b"] and "".join(d.text for d in deltas) == "Hello world"
            assert deltas[-1].finish_reason == FinishReason.STOP
            assert s.engine.num_failovers == 1

    asyncio.run(scenario())


def test_a_stream_without_usage_is_an_error_not_a_guess():
    no_usage = sse(content("x"), {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]")

    async def scenario():
        async with scripted({"a": no_usage}) as s:
            final = (await drain(s.engine, chat(s.engine)))[-1]
            assert final.finish_reason == FinishReason.ERROR and "usage" in final.error

    asyncio.run(scenario())


def test_sse_lines_may_end_with_crlf():
    async def scenario():
        async with scripted({"a": good(end="\r\n")}) as s:
            deltas = await drain(s.engine, chat(s.engine))
            assert "".join(d.text for d in deltas) == "Hello world"
            assert (deltas[-1].finish_reason, deltas[-1].num_generated_tokens) == (FinishReason.STOP, 2)

    asyncio.run(scenario())


def test_closing_the_stream_releases_the_upstream_slot_and_closes_its_connection():
    async def scenario():
        async with scripted({"a": Hold(sse(content("Hel"), content("lo")))}) as s:
            stream = s.engine.submit(chat(s.engine))
            async for delta in stream:
                if delta.text:
                    break
            assert s.engine.stats()["num_running"] == 1 and s.upstreams["a"].hangups == 0
            await stream.aclose()  # the client went away
            assert s.engine.stats()["num_running"] == 0
            await until(lambda: s.upstreams["a"].hangups == 1)  # the upstream saw its connection close: it aborts

    asyncio.run(scenario())


def test_sequential_requests_reuse_one_upstream_connection():
    async def scenario():
        async with scripted({"a": GOOD}) as s:
            for _ in range(5):
                deltas = await drain(s.engine, chat(s.engine))
                assert deltas[-1].finish_reason == FinishReason.STOP
                # The stream ends at [DONE]; its reader goes on to the terminating chunk (written 5 ms later
                # here), then the connection is back in the pool: the next request starts after that.
                await until(lambda: not remote_engine._tasks)
            assert len(s.upstreams["a"].requests) == 5
            assert s.upstreams["a"].connections == 1  # each reader read its body to the end after [DONE]

    asyncio.run(scenario())


def test_the_upstream_key_is_sent_and_never_shown():
    async def scenario():
        async with scripted({"a": GOOD}) as s:
            await drain(s.engine, chat(s.engine))
            assert [h.get("authorization") for h, _ in s.upstreams["a"].requests] == [f"Bearer {KEY}"]
            assert KEY not in repr(s.engine.spec) and KEY not in json.dumps(s.engine.stats())

    asyncio.run(scenario())


def test_health_probes():
    async def scenario():
        async with scripted({"a": GOOD, "b": GOOD, "c": REFUSED}, eject_after=1) as s:
            s.upstreams["b"].health = 503
            states = s.engine.router.upstreams
            assert [await s.engine.probe(state) for state in states] == [True, False, False]
            assert [u["healthy"] for u in s.engine.stats()["upstreams"]] == [True, False, False]
            assert await s.engine.probe(states[0]) and s.upstreams["a"].connections == 1  # kept alive
            assert s.hosts == []  # probes are GETs of /health, not requests

    asyncio.run(scenario())


def test_upstream_health_is_exported_as_a_prometheus_gauge():
    from deepserve.observability.metrics import REGISTRY

    async def scenario():
        async with scripted({"a": REFUSED, "b": GOOD}, eject_after=1) as s:
            s.engine.model_id = "remote-gauge"  # its own series, whatever other tests exported
            await drain(s.engine, chat(s.engine))
            return s.urls

    urls = asyncio.run(scenario())

    def up(name: str) -> float | None:
        return REGISTRY.get_sample_value("deepserve_upstream_up", {"model": "remote-gauge", "upstream": urls[name]})

    assert (up("a"), up("b")) == (0.0, 1.0)  # a: ejected after its one failure; b: answered


def test_a_template_longer_than_the_bound_raises_the_next_chats_bound():
    """The upstream counted more prompt tokens than the chat's bound (its template adds a long preamble): the
    reservation, which rests on the bound, would have fallen short; later chats carry the difference."""
    long_template = sse(content("ok"), {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                        {"choices": [], "usage": {"prompt_tokens": 1105, "completion_tokens": 1}}, "[DONE]")

    async def scenario() -> None:
        async with scripted({"a": long_template}) as s:
            first = chat(s.engine)
            assert len(first.prompt_tokens) < 1105
            deltas = await drain(s.engine, first)
            assert deltas[-1].finish_reason == FinishReason.STOP and deltas[-1].num_prompt_tokens == 1105
            assert len(chat(s.engine).prompt_tokens) >= 1105  # the same chat now bounds what it really costs
            assert len(s.engine.text_prompt("hi")) < 10  # raw completions have no template: unchanged

    asyncio.run(scenario())


def test_max_tokens_past_the_context_window_is_refused_before_anything_is_sent():
    from deepserve.errors import ContextLengthError

    async def scenario() -> None:
        async with scripted({"a": GOOD}) as s:
            with pytest.raises(ContextLengthError) as refused:
                s.engine.check_fits(10, 5000)  # context_window 4096
            assert refused.value.param == "max_tokens" and "4096" in refused.value.message
            s.engine.check_fits(4000, 4000)  # a prompt's count is only a bound here: the upstream judges the sum
            assert s.hosts == []

    asyncio.run(scenario())
