"""RemoteEngine's failure semantics against scripted upstreams (httpx.MockTransport), in addition to the
real-process tests in test_gateway.py: the cases a real deepserve upstream cannot be made to produce on demand
(a 500, a 429, a stream that breaks after N chunks, a stream without usage)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from deepserve.engine.remote import RemoteEngine, RemoteModelSpec
from deepserve.engine.types import FinishReason, GenerateRequest, ReasoningParams, SamplingParams
from deepserve.errors import InvalidRequestError, QueueFullError, ServiceUnavailableError
from deepserve.serving import read_ahead


def sse(*payloads: dict | str) -> list[bytes]:
    return [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode() for p in payloads]


def content(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


GOOD = sse(content("Hello"), content(" world"),
           {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
           {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}, "[DONE]")


class Broken(httpx.AsyncByteStream):
    """Sends its chunks, then fails the way a killed upstream's connection does."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk
        raise httpx.ReadError("connection reset by peer")


class Upstreams:
    """Scripted upstreams by host: each answers what its script says, and the requests are recorded."""

    def __init__(self, scripts: dict[str, object]):
        self.scripts = scripts
        self.requests: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/health":
            return httpx.Response(200)
        self.requests.append((host, json.loads(request.content)))
        script = self.scripts[host]
        if isinstance(script, Exception):
            raise script
        if isinstance(script, httpx.Response):
            return script
        if isinstance(script, Broken):
            return httpx.Response(200, stream=script, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, content=b"".join(script), headers={"content-type": "text/event-stream"})

    @property
    def hosts(self) -> list[str]:
        return [host for host, _ in self.requests]


def engine(upstreams: Upstreams, hosts: list[str], **spec) -> RemoteEngine:
    config = RemoteModelSpec.model_validate({
        "id": "remote", "context_window": 4096, "health_interval_s": 0,
        "upstreams": [{"url": f"http://{h}:8000/v1", "api_key": "sk-up-secret"} for h in hosts], **spec})
    return RemoteEngine(config, transport=httpx.MockTransport(upstreams))


def chat(e: RemoteEngine) -> GenerateRequest:
    prompt = e.chat_prompt([{"role": "user", "content": "hi"}])
    return GenerateRequest(prompt, SamplingParams(max_tokens=16, reasoning=ReasoningParams()))


async def drain(e: RemoteEngine, request: GenerateRequest) -> list:
    stream = e.submit(request)
    return [d async for d in stream]


def test_the_first_read_fails_over_past_refused_and_failing_upstreams():
    ups = Upstreams({"a": httpx.ConnectError("refused"), "b": httpx.Response(500, json={"error": "boom"}),
                     "c": GOOD})
    e = engine(ups, ["a", "b", "c"])
    deltas = asyncio.run(drain(e, chat(e)))
    assert ups.hosts == ["a", "b", "c"] and e.num_failovers == 2
    assert "".join(d.text for d in deltas) == "Hello world"
    final = deltas[-1]
    assert (final.finish_reason, final.num_prompt_tokens, final.num_generated_tokens) == (FinishReason.STOP, 7, 2)
    body = ups.requests[-1][1]
    assert body["stream"] is True and body["stream_options"]["include_usage"] is True
    stats = e.stats()["upstreams"]
    assert [u["num_failures"] for u in stats] == [1, 1, 0]


def test_no_upstream_left_raises_before_anything_is_streamed():
    ups = Upstreams({"a": httpx.ConnectError("refused"), "b": httpx.ConnectTimeout("slow")})
    e = engine(ups, ["a", "b"])

    async def first():
        stream = e.submit(chat(e))
        return await read_ahead(stream)

    with pytest.raises(ServiceUnavailableError) as caught:
        asyncio.run(first())
    assert "2 tried of 2" in caught.value.message and "sk-up-secret" not in caught.value.message
    assert "upstream #1: connection refused" in caught.value.message and "timed out" in caught.value.message


def test_every_upstream_busy_is_a_429_and_does_not_count_as_a_failure():
    busy = httpx.Response(429, json={"error": {"message": "queue full"}})
    ups = Upstreams({"a": busy, "b": busy})
    e = engine(ups, ["a", "b"], eject_after=1)
    with pytest.raises(QueueFullError):
        asyncio.run(drain(e, chat(e)))
    assert [u["num_failures"] for u in e.stats()["upstreams"]] == [0, 0]


def test_an_upstream_400_is_the_requests_fault_with_the_upstreams_message_and_no_failover():
    bad = httpx.Response(400, json={"error": {"message": "This model's maximum context length is 4096 tokens."}})
    ups = Upstreams({"a": bad, "b": GOOD})
    e = engine(ups, ["a", "b"])
    with pytest.raises(InvalidRequestError, match="maximum context length is 4096"):
        asyncio.run(drain(e, chat(e)))
    assert ups.hosts == ["a"] and e.stats()["upstreams"][0]["num_failures"] == 0


def test_a_break_after_output_ends_with_an_error_delta_counting_what_was_delivered():
    ups = Upstreams({"a": Broken(sse(content("Hel"), content("lo"))), "b": GOOD})
    e = engine(ups, ["a", "b"])
    deltas = asyncio.run(drain(e, chat(e)))
    assert ups.hosts == ["a"]  # no failover once output has left
    assert "".join(d.text for d in deltas) == "Hello"
    final = deltas[-1]
    assert final.finish_reason == FinishReason.ERROR and "mid-stream" in final.error
    assert (final.num_generated_tokens, sum(d.num_tokens for d in deltas)) == (2, 2)
    assert e.num_broken_streams == 1


def test_a_break_before_output_fails_over_unseen():
    ups = Upstreams({"a": Broken(sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})), "b": GOOD})
    e = engine(ups, ["a", "b"])
    deltas = asyncio.run(drain(e, chat(e)))
    assert ups.hosts == ["a", "b"] and "".join(d.text for d in deltas) == "Hello world"
    assert deltas[-1].finish_reason == FinishReason.STOP


def test_a_stream_without_usage_is_an_error_not_a_guess():
    ups = Upstreams({"a": sse(content("x"), {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                              "[DONE]")})
    e = engine(ups, ["a"])
    final = asyncio.run(drain(e, chat(e)))[-1]
    assert final.finish_reason == FinishReason.ERROR and "usage" in final.error


def test_closing_the_stream_releases_the_upstream_slot():
    ups = Upstreams({"a": GOOD})
    e = engine(ups, ["a"])

    async def partial():
        stream = e.submit(chat(e))
        async for delta in stream:
            if delta.text:
                break
        assert e.stats()["num_running"] == 1
        await stream.aclose()

    asyncio.run(partial())
    assert e.stats()["num_running"] == 0


def test_the_upstream_key_is_sent_and_never_shown():
    ups = Upstreams({"a": GOOD})
    e = engine(ups, ["a"])
    seen = []
    transport = httpx.MockTransport(lambda r: (seen.append(r.headers.get("authorization")), ups(r))[1])
    e._transport = transport
    asyncio.run(drain(e, chat(e)))
    assert seen == ["Bearer sk-up-secret"]
    assert "sk-up-secret" not in repr(e.spec) and "sk-up-secret" not in json.dumps(e.stats())


def test_upstream_health_is_exported_as_a_prometheus_gauge():
    from deepserve.observability.metrics import REGISTRY

    ups = Upstreams({"a": httpx.ConnectError("refused"), "b": GOOD})
    e = engine(ups, ["a", "b"], eject_after=1)
    e.model_id = "remote-gauge"  # its own series, whatever other tests exported
    asyncio.run(drain(e, chat(e)))

    def up(host: str) -> float | None:
        return REGISTRY.get_sample_value("deepserve_upstream_up",
                                         {"model": "remote-gauge", "upstream": f"http://{host}:8000/v1"})

    assert (up("a"), up("b")) == (0.0, 1.0)  # a: ejected after its one failure; b: answered
