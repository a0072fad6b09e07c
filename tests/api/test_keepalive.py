"""A non-streaming answer that sends blank lines while it is late (deepserve/api/keepalive.py), driven as
Starlette drives a response."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.responses import JSONResponse

from deepserve.api.keepalive import JsonAfterBlankLines
from deepserve.errors import DeepserveError, EngineError
from tests.api.responses import bodies, never_receive, scope


def render_error(error: DeepserveError) -> JSONResponse:
    return JSONResponse({"error": {"message": error.message}}, status_code=error.status_code)


async def respond(answer, keepalive_s: float, sent: list[dict], on_send=None) -> None:
    async def send(message: dict) -> None:
        sent.append(message)
        if on_send is not None:
            on_send(sent)

    await JsonAfterBlankLines(answer, render_error)(scope(keepalive_s), never_receive, send)


def sent_for_a_late(outcome) -> list[dict]:
    """What goes out for an answer that comes, or fails, once two blank lines were written: `outcome()` is
    awaited for it then."""
    async def main() -> list[dict]:
        release = asyncio.Event()

        async def answer():
            await release.wait()
            return await outcome()

        def on_send(sent: list[dict]) -> None:
            if bodies(sent).count(b"\n") >= 2:
                release.set()

        sent: list[dict] = []
        await respond(answer(), 0.01, sent, on_send)
        return sent

    return asyncio.run(main())


def test_an_answer_in_time_goes_out_as_it_is():
    async def answer():
        return JSONResponse({"ok": 1}, status_code=201)

    sent: list[dict] = []
    asyncio.run(respond(answer(), 60, sent))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 201
    assert bodies(sent) == [b'{"ok":1}']


def test_an_error_in_time_is_raised_for_the_apps_handlers_and_nothing_is_sent():
    async def answer():
        raise EngineError("boom")

    sent: list[dict] = []
    with pytest.raises(EngineError):
        asyncio.run(respond(answer(), 60, sent))
    assert sent == []


def test_a_late_answer_is_preceded_by_blank_lines_and_parses_as_json():
    async def outcome():
        return JSONResponse({"choices": [{"text": "hi"}]}, status_code=200)

    sent = sent_for_a_late(outcome)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    body = bodies(sent)
    assert body[:2] == [b"\n", b"\n"] and set(body[:-1]) == {b"\n"}
    assert sent[-1]["more_body"] is False
    assert json.loads(b"".join(body)) == {"choices": [{"text": "hi"}]}


def test_a_late_error_goes_in_the_body_as_the_dialects_error():
    async def outcome():
        raise EngineError("The engine failed while generating: x")

    sent = sent_for_a_late(outcome)
    assert sent[0]["status"] == 200  # sent before the error was known
    assert json.loads(b"".join(bodies(sent))) == {"error": {"message": "The engine failed while generating: x"}}


def test_a_client_gone_cancels_the_answer():
    async def main() -> bool:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def answer():
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        sent: list[dict] = []
        late = asyncio.Event()
        task = asyncio.ensure_future(respond(answer(), 0.01, sent, lambda sent: late.set()))
        await started.wait()
        await late.wait()  # it is late and writing blank lines
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled.is_set()

    assert asyncio.run(main()) is True


def test_a_late_unexpected_error_is_logged_and_worded_as_the_apps_handler_words_it(caplog):
    async def outcome():
        raise RuntimeError("internal detail")

    message = json.loads(b"".join(bodies(sent_for_a_late(outcome))))["error"]["message"]
    assert message == "The server had an error while processing your request."  # no internals to the caller
    assert any("internal detail" in (r.exc_text or "") for r in caplog.records)
