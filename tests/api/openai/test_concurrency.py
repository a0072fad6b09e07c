"""Continuous batching, abort on disconnect and the waiting-queue limit, through real HTTP."""

from __future__ import annotations

import asyncio

import httpx
import openai

from tests.conftest import engine_stats
from tests.server import start_server


def wait_for_a_token(lines) -> None:
    """Read a chat stream until a chunk carries generated text: the request then holds its slot. (The role
    chunk, `"content":""`, goes out before the engine has taken the request off its queue.)"""
    while True:
        line = next(lines)
        if '"content":"' in line and '"content":""' not in line:
            return


def test_eight_concurrent_streams_all_complete_and_share_decode_steps(server, http):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=32,
            stream=True, extra_body={"ignore_eos": True},
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(main())
    assert all(finish == "length" and text for text, finish in results)
    assert engine_stats(http)["max_seqs_in_step"] >= 2


def test_a_load_tests_first_wave_of_a_hundred_is_queued_not_refused(server):
    """Load tools start hundreds of requests at once (vLLM's benchmark_serving at --request-rate inf, llmperf);
    llama-server and vLLM queue them all. With the default --max-queue so do we: 100 at once on 8 slots, none
    refused (the SDK's retries are off, so a 429 would fail the test)."""
    async def one(client: openai.AsyncOpenAI, i: int) -> str | None:
        r = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=16,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].finish_reason

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0,
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        limits=httpx.Limits(max_connections=100), timeout=300))
        return await asyncio.gather(*(one(client, i) for i in range(100)))

    assert asyncio.run(main()) == ["length"] * 100


def test_disconnecting_client_frees_its_slot():
    running = start_server("--parallel", "1", "--ctx-size", "4096")
    try:
        headers = {"Authorization": f"Bearer {running.api_key}"}
        body = {"model": running.model, "messages": [{"role": "user", "content": "Write a long essay."}],
                "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=running.root_url, headers=headers, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                received = [next(lines) for _ in range(6)]  # role chunk + a few tokens, then hang up
                assert all(line.startswith("data: ") or line == "" for line in received)
            # The only slot must be free for this one to run at all; it ends after 5 tokens.
            short = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5}).json()
            assert short["choices"][0]["finish_reason"] == "length"
            stats = engine_stats(http)
        assert stats["num_requests_finished"] == 2
        # the abandoned request stopped far short of its 3000 tokens
        assert stats["num_generated_tokens"] < 3000
    finally:
        running.stop()


def test_full_waiting_queue_answers_429_with_retry_after():
    running = start_server("--parallel", "1", "--max-queue", "1", "--ctx-size", "4096")
    try:
        headers = {"Authorization": f"Bearer {running.api_key}"}
        long = {"model": running.model, "messages": [{"role": "user", "content": "Go on."}],
                "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=running.root_url, headers=headers, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=long) as first:
                first_lines = first.iter_lines()
                wait_for_a_token(first_lines)  # the first request is decoding: slot taken, queue empty
                with http.stream("POST", "/v1/chat/completions", json=long) as second:  # waits for the slot
                    assert second.status_code == 200
                    third = http.post("/v1/chat/completions", json={**long, "stream": False})
                    assert third.status_code == 429
                    assert int(third.headers["Retry-After"]) >= 1
                    assert third.json()["error"]["code"] == "queue_full"
            # The server learns of the two hang-ups asynchronously; the SDK's own retry (which honours
            # Retry-After) is what a real client does here.
            sdk = openai.OpenAI(base_url=running.base_url, api_key=running.api_key, max_retries=5)
            after = sdk.chat.completions.create(model=running.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
            assert after.choices[0].finish_reason in ("stop", "length")
    finally:
        running.stop()


def test_waiting_stream_gets_keepalive_comments_then_its_answer():
    running = start_server("--parallel", "1", "--ctx-size", "4096", "--sse-keepalive", "0.2")
    try:
        headers = {"Authorization": f"Bearer {running.api_key}"}
        body = {"model": running.model, "messages": [{"role": "user", "content": "Go on."}], "stream": True}
        with httpx.Client(base_url=running.root_url, headers=headers, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 3000, "ignore_eos": True}) as first:
                first_lines = first.iter_lines()
                wait_for_a_token(first_lines)  # the only slot is now busy
                with http.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 3}) as waiting:
                    lines = waiting.iter_lines()
                    assert next(lines).startswith("data: ")  # role chunk comes at once
                    while (line := next(lines)) == "":
                        pass
                    assert line == ": keep-alive"
                    first.close()  # free the slot: the waiting request runs
                    rest = [line for line in lines if line.startswith("data: ")]
                    assert rest[-1] == "data: [DONE]"
                    assert any('"finish_reason":"length"' in line for line in rest)
    finally:
        running.stop()


def test_waiting_non_streaming_request_gets_blank_lines_then_its_answer_through_the_sdk():
    """DeepSeek's behaviour: a non-streaming request that waits gets its 200 and blank lines until the answer;
    the openai SDK reads the answer as usual."""
    import threading

    running = start_server("--parallel", "1", "--ctx-size", "4096", "--sse-keepalive", "0.2")
    try:
        headers = {"Authorization": f"Bearer {running.api_key}"}
        body = {"model": running.model, "messages": [{"role": "user", "content": "Go on."}], "stream": True,
                "max_tokens": 3000, "ignore_eos": True}
        committed = threading.Event()  # the waiting request's response headers arrived before its answer

        def on_response(response: httpx.Response) -> None:
            committed.set()

        sdk = openai.OpenAI(base_url=running.base_url, api_key=running.api_key, max_retries=0,
                            http_client=httpx.Client(event_hooks={"response": [on_response]}, timeout=120))
        answers: list = []
        with httpx.Client(base_url=running.root_url, headers=headers, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as first:
                wait_for_a_token(first.iter_lines())  # the only slot is now busy
                waiting = threading.Thread(target=lambda: answers.append(sdk.chat.completions.create(
                    model=running.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                    extra_body={"ignore_eos": True})))
                waiting.start()
                assert committed.wait(60)  # the 200 came while it still waited for the slot
                first.close()  # free the slot: the waiting request runs
            waiting.join(60)
        [answer] = answers
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3

        with httpx.Client(base_url=running.root_url, headers=headers, timeout=120) as http:
            quick = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert quick.status_code == 200 and quick.content.startswith(b"{")  # in time: no blank line
    finally:
        running.stop()


def test_non_streaming_client_that_hangs_up_frees_its_slot():
    import json
    import socket

    running = start_server("--parallel", "1", "--ctx-size", "4096")
    try:
        host, port = running.root_url.removeprefix("http://").split(":")
        body = json.dumps({"model": running.model, "messages": [{"role": "user", "content": "Write a long essay."}],
                           "max_tokens": 3000, "ignore_eos": True}).encode()
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {running.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        headers = {"Authorization": f"Bearer {running.api_key}"}
        with httpx.Client(base_url=running.root_url, headers=headers, timeout=120) as http:
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(request)
                # wait until the engine is generating for it, then hang up without reading
                while engine_stats(http)["num_running"] == 0:
                    pass
            short = http.post("/v1/chat/completions", json={
                "model": running.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                "ignore_eos": True}).json()
            assert short["choices"][0]["finish_reason"] == "length"
            stats = engine_stats(http)
        assert stats["num_requests_finished"] == 2
        assert stats["num_generated_tokens"] < 3000
    finally:
        running.stop()


def test_served_engine_pins_its_threads_to_the_processs_cpus_unless_told_not_to(server, http):
    import os

    # The shared server runs with the default thread count (every CPU this process may use): pinned, one each.
    assert engine_stats(http)["cpus"] == sorted(os.sched_getaffinity(0))
    unpinned = start_server("--no-pin-threads", "--parallel", "1", "--ctx-size", "256", threads=None)
    try:
        with httpx.Client(base_url=unpinned.root_url, headers={"Authorization": f"Bearer {unpinned.api_key}"}) as c:
            assert engine_stats(c)["cpus"] == []
            answer = openai.OpenAI(base_url=unpinned.base_url, api_key=unpinned.api_key, max_retries=0)
            reply = answer.chat.completions.create(model=unpinned.model, max_tokens=3,
                                                   messages=[{"role": "user", "content": "Hi"}],
                                                   extra_body={"ignore_eos": True})
            assert reply.usage.completion_tokens == 3
    finally:
        unpinned.stop()
