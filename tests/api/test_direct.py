"""Direct writes (api/direct.py): the engine thread's own chunks on a real socket, in order, framed as h11 frames
them; the rest of a partial write handed to the loop; nothing written once closed."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from types import SimpleNamespace

import h11
import pytest
from h11._writers import ChunkedWriter
from uvicorn.protocols.http.h11_impl import RequestResponseCycle

from deepserve.api.direct import BODY_RECORDED_KEY, CYCLE_KEY, MARK, DirectText, DirectWriter, open_direct
from deepserve.api.sse import event
from tests.conftest import engine_stats

SAMPLE = event({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": MARK}, "finish_reason": None}]})


def parse_chunked(data: bytes) -> list[bytes]:
    """The chunks of a chunked HTTP/1.1 body, read with h11 as a client would (the body never ends here)."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    client.send(h11.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + data)
    chunks = []
    while True:
        got = client.next_event()
        if got is h11.NEED_DATA:
            return chunks
        if isinstance(got, h11.Data):
            chunks.append(bytes(got.data))


def texts_of(events: bytes) -> list[str]:
    assert events.endswith(b"\n\n")
    return [json.loads(e.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
            for e in events.split(b"\n\n") if e]


async def connected_writer(*, send_buffer: int | None = None):
    """A DirectWriter on the server end of a real connection (with an asyncio transport, as uvicorn's), and the
    client end's socket."""
    server_end, client_end = socket.socketpair()
    if send_buffer is not None:
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        client_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    client_end.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=server_end)
    writer = DirectWriter(os.dup(transport.get_extra_info("socket").fileno()), transport, SAMPLE, chunked=True)
    return writer, transport, client_end


def read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = bytearray()
    while True:
        try:
            got = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(data)
        if not got:
            return bytes(data)
        data += got


def test_text_is_rendered_into_the_sample_and_framed_as_h11_frames_it():
    async def main():
        writer, transport, client = await connected_writer()
        texts = ["Hello", ' "quoted"\n', "é中😀", "\\"]
        done = threading.Thread(target=lambda: [writer.send_text(t, 1) for t in texts])
        done.start()
        done.join()
        assert writer.send_text("", 1)  # a token with no text yet (a partial character): counted, nothing written
        writer.close()
        transport.close()
        return writer, texts, read_all(client)

    writer, texts, data = asyncio.run(main())
    chunks = parse_chunked(data)
    assert [texts_of(c) for c in chunks] == [[t] for t in texts]
    assert chunks[0] == SAMPLE.replace(json.dumps(MARK, ensure_ascii=False).encode(), b'"Hello"')
    assert writer.num_tokens == 5 and writer.first_token_at is not None and not writer.broken


def test_the_rest_of_a_partial_write_reaches_the_client_before_anything_the_loop_writes_after_it():
    """A client that does not read: the kernel takes part of a frame. The rest goes to the transport, the writer
    turns itself off (later text goes the loop's way), and the client reads every frame whole and in order."""

    async def main():
        writer, transport, client = await connected_writer(send_buffer=4096)
        sent = []
        long_text = "word " * 200
        for i in range(2000):  # bounded: the socket's buffers hold far less than this
            text = f"{i}:{long_text}"
            if not writer.send_text(text, 1):
                break
            sent.append(text)
        assert writer.broken, "the send buffer never filled"
        assert not writer.send_text("after", 1)  # the loop's way from now on
        assert not writer.can_arm()
        later = b"data: " + json.dumps({"choices": [{"delta": {"content": "later"}}]}).encode() + b"\n\n"
        writer.flush_rest()  # what the loop does before its own next write
        transport.write(b"%x\r\n%s\r\n" % (len(later), later))
        received = bytearray()
        loop = asyncio.get_running_loop()
        while transport.get_write_buffer_size() or not received.endswith(later + b"\r\n"):
            received += await loop.sock_recv(client, 1 << 16)
        writer.close()
        transport.close()
        return sent, bytes(received)

    sent, received = asyncio.run(main())
    chunks = parse_chunked(received)
    assert [t for c in chunks[:-1] for t in texts_of(c)] == sent
    assert texts_of(chunks[-1]) == ["later"]


def test_the_rest_of_a_partial_write_from_the_engine_thread_is_written_by_the_loop_on_its_own():
    async def main():
        writer, transport, client = await connected_writer(send_buffer=4096)
        sent = []

        def engine_thread():
            for i in range(2000):
                text = f"{i}:" + "x" * 1000
                if not writer.send_text(text, 1):
                    return
                sent.append(text)
                if writer.broken:
                    return

        thread = threading.Thread(target=engine_thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        assert writer.broken
        loop = asyncio.get_running_loop()
        received = bytearray()
        expected_end = json.dumps(sent[-1]).encode() + b"}"
        while expected_end not in received[-len(expected_end) - 64:] or transport.get_write_buffer_size():
            received += await loop.sock_recv(client, 1 << 16)
        writer.close()
        transport.close()
        return sent, bytes(received)

    sent, received = asyncio.run(main())
    assert [t for c in parse_chunked(received) for t in texts_of(c)] == sent


def test_a_closed_writer_writes_nothing_and_releases_its_descriptor():
    async def main():
        writer, transport, client = await connected_writer()
        fd = writer._fd
        writer.close()
        writer.close()  # twice: harmless
        with pytest.raises(OSError):
            os.fstat(fd)
        assert not writer.send_text("late", 1)
        assert writer.num_tokens == 0
        transport.close()
        return read_all(client)

    assert asyncio.run(main()) == b""


def test_a_sample_without_exactly_one_mark_is_refused():
    async def main():
        server_end, client_end = socket.socketpair()
        transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=server_end)
        try:
            with pytest.raises(ValueError):
                DirectWriter(-1, transport, b"data: {}\n\n", chunked=True)
        finally:
            transport.close()
            client_end.close()

    asyncio.run(main())


class FakeTransport:
    """What open_direct asks of uvicorn's transport."""

    def __init__(self, extra: dict):
        self.extra = extra

    def get_extra_info(self, name: str):
        return self.extra.get(name)


def h11_cycle(transport: FakeTransport) -> RequestResponseCycle:
    """uvicorn's cycle of a request whose chunked response has started (only what open_direct reads)."""
    cycle = RequestResponseCycle.__new__(RequestResponseCycle)
    cycle.disconnected = cycle.response_complete = False
    cycle.conn = SimpleNamespace(_writer=ChunkedWriter())
    cycle.transport = transport  # type: ignore[assignment]
    return cycle


def test_there_are_no_direct_writes_over_tls_or_where_a_middleware_records_the_body():
    async def main():
        server_end, client_end = socket.socketpair()
        try:
            plain = {CYCLE_KEY: h11_cycle(FakeTransport({"socket": server_end})), "method": "POST"}
            tls = {CYCLE_KEY: h11_cycle(FakeTransport({"socket": server_end, "ssl_object": object()})),
                   "method": "POST"}
            writer = open_direct(plain, DirectText(None, SAMPLE))
            assert writer is not None  # the same request over plain TCP gets one
            writer.close()
            return (open_direct(tls, DirectText(None, SAMPLE)),
                    open_direct({**plain, BODY_RECORDED_KEY: True}, DirectText(None, SAMPLE)),
                    open_direct({**plain, "method": "HEAD"}, DirectText(None, SAMPLE)))
        finally:
            server_end.close()
            client_end.close()

    assert asyncio.run(main()) == (None, None, None)


# ---- through the real server ---------------------------------------------------------------------------------
def direct_tokens(http) -> int:
    return engine_stats(http)["num_direct_tokens"]


GREEDY = {"temperature": 0, "max_tokens": 40, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "Name three rivers and say something about each."}]


def test_a_streamed_chat_goes_out_directly_and_reads_as_the_same_answer(client, http, server):
    whole = client.chat.completions.create(model=server.model, messages=MESSAGES, **GREEDY)
    before = direct_tokens(http)
    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    written = direct_tokens(http) - before
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40
    assert 0 < written <= 40  # most tokens went out from the engine thread (the last one never does)


def test_a_streamed_completion_goes_out_directly_and_reads_as_the_same_text(client, http, server):
    prompt = "The three largest rivers of Europe are"
    whole = client.completions.create(model=server.model, prompt=prompt, **GREEDY)
    before = direct_tokens(http)
    chunks = list(client.completions.create(model=server.model, prompt=prompt, stream=True, **GREEDY))
    assert direct_tokens(http) > before
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chunks_that_carry_more_than_text_go_through_the_loop(client, http, server):
    before = direct_tokens(http)
    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, stream=True, logprobs=True,
                                                 top_logprobs=2, **GREEDY))
    assert direct_tokens(http) == before
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content and all(len(c.choices[0].logprobs.content[0].top_logprobs) == 2 for c in content)


def test_a_stream_recorded_for_an_idempotent_retry_is_not_written_directly(http, server):
    body = {"model": server.model, "messages": MESSAGES, "stream": True, "temperature": 0, "max_tokens": 40}
    headers = {"Idempotency-Key": f"direct-{os.getpid()}-{id(body)}"}
    before = direct_tokens(http)
    first = http.post("/v1/chat/completions", json=body, headers=headers)
    assert direct_tokens(http) == before  # every byte passed the middleware that records the answer
    replay = http.post("/v1/chat/completions", json=body, headers=headers)  # at once: the answer is stored already
    assert first.status_code == replay.status_code == 200 and replay.headers.get("idempotent-replayed") == "true"
    assert replay.content == first.content and first.content.endswith(b"data: [DONE]\n\n")


def test_an_http_1_0_client_gets_the_direct_chunks_unframed_until_the_connection_closes(http, server):
    """HTTP/1.0 has no chunked encoding: h11 sends the body as it is and ends it by closing the connection, and
    the direct writes must do the same."""
    body = json.dumps({"model": server.model, "messages": MESSAGES, "stream": True, "temperature": 0,
                       "max_tokens": 24}).encode()
    whole = http.post("/v1/chat/completions", json={**json.loads(body), "stream": False}).json()
    before = direct_tokens(http)
    host, port = server.root_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + server.api_key.encode() + b"\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        response = bytearray()
        while chunk := sock.recv(1 << 16):  # until the server closes: the end of an HTTP/1.0 body
            response += chunk
    head, _, events = bytes(response).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert direct_tokens(http) > before
    data = [line.removeprefix(b"data: ") for line in events.split(b"\n\n") if line]
    assert data[-1] == b"[DONE]"
    content = "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-1])
    assert content == whole["choices"][0]["message"]["content"]
