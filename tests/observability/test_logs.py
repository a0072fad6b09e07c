"""One structured log line per request, read back from a real server's stderr: the right fields, never a key,
never the prompt unless the operator turned prompt logging on."""

from __future__ import annotations

import json
import logging
import sys

import httpx
import openai
import pytest

from deepserve.observability.logs import JsonFormatter, StripQueryString, TextFormatter
from tests.observability.conftest import API_KEY, log_lines, request_line, text_line
from tests.server import start_server

PROMPT = "Describe the zebra-marmalade-4711 festival in one line."


def test_a_chat_request_logs_one_json_line_with_usage_and_no_key_or_prompt(json_server):
    client = openai.OpenAI(base_url=json_server.base_url, api_key=API_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=json_server.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=7, temperature=0,
        extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "client-chosen.id-42"},
    )
    usage = raw.parse().usage
    assert raw.headers["x-request-id"] == "client-chosen.id-42"  # a plain client id is kept and echoed
    line = request_line(json_server, "client-chosen.id-42")

    assert line["level"] == "info" and line["msg"] == "request"
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert (line["model"], line["dialect"], line["status"], line["finish_reason"]) == \
        (json_server.model, "openai", 200, "length")
    assert (line["prompt_tokens"], line["cached_tokens"], line["completion_tokens"], line["reasoning_tokens"]) == \
        (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, 7, 0)
    assert 0 < line["ttft_ms"] <= line["latency_ms"]
    assert "prompt" not in line and "key_id" not in line  # an operator key from configuration has no id
    text = json_server.log()
    assert API_KEY not in text
    assert "zebra-marmalade" not in text


def test_a_streamed_workers_ai_request_is_logged_in_its_dialect(json_server):
    with httpx.stream("POST", f"{json_server.root_url}/client/v4/accounts/acct/ai/run/@cf/{json_server.model}",
                      headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "has spaces, so replaced"},
                      json={"prompt": PROMPT, "max_tokens": 5, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        body = r.read().decode()
        request_id = r.headers["x-request-id"]
    assert request_id.startswith("req_")  # not a plain token: the server made its own
    usage = json.loads([ln for ln in body.splitlines() if '"usage"' in ln][-1][6:])["usage"]
    line = request_line(json_server, request_id)
    assert (line["dialect"], line["status"]) == ("workers_ai", 200)
    assert line["path"] == f"/client/v4/accounts/acct/ai/run/@cf/{json_server.model}"
    assert line["completion_tokens"] == usage["completion_tokens"] and line["finish_reason"] in ("stop", "length")
    assert "zebra-marmalade" not in json_server.log()


def test_probes_and_scrapes_are_not_logged(json_server):
    before = len([ln for ln in log_lines(json_server) if ln.get("logger") == "deepserve.requests"])
    for path in ("/metrics", "/v1/metrics", "/health", "/v1/health/live", "/v1/health/ready"):
        assert httpx.get(json_server.root_url + path, timeout=30).status_code == 200
    r = httpx.get(json_server.base_url + "/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    request_line(json_server, r.headers["x-request-id"])  # a real API request is, and comes after the probes
    after = [ln for ln in log_lines(json_server) if ln.get("logger") == "deepserve.requests"]
    assert len(after) == before + 1


@pytest.fixture(scope="module")
def prompt_logging_server():
    running = start_server("--log-format", "json", "--log-prompts", "--log-level", "info", "--parallel", "2",
                           "--ctx-size", "256", api_key=API_KEY)
    yield running
    running.stop()


def test_prompt_logging_puts_the_prompt_in_the_line_but_never_the_key(prompt_logging_server):
    running = prompt_logging_server
    r = httpx.post(running.base_url + "/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": running.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3},
                   timeout=120)
    assert r.status_code == 200
    line = request_line(running, r.headers["x-request-id"])
    assert line["prompt"] == {"messages": [{"role": "user", "content": PROMPT}]}
    d = httpx.post(running.root_url + "/api/v1", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": running.model, "data": {"messages": [{"role": "user", "content": "dataoorts-said"}],
                                                          "max_tokens": 2}}, timeout=120)
    assert d.status_code == 200
    assert request_line(running, d.headers["x-request-id"])["prompt"] == \
        {"messages": [{"role": "user", "content": "dataoorts-said"}]}
    assert API_KEY not in running.log()


def test_access_log_lines_drop_the_query_string(prompt_logging_server):
    running = prompt_logging_server
    secret = "sk-in-the-query-string-9f8e"
    r = httpx.get(running.base_url + "/models", params={"api_key": secret},
                  headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200
    line = request_line(running, r.headers["x-request-id"])
    assert line["path"] == "/v1/models"
    access = [ln for ln in log_lines(running) if ln.get("logger") == "uvicorn.access" and "/v1/models" in ln["msg"]]
    assert access, running.log()[-2000:]  # --log-level info: uvicorn's access lines are on, as JSON
    assert secret not in running.log()


def test_the_default_text_format_writes_key_value_request_lines(server, http):
    r = http.get("/v1/models", headers={"X-Request-Id": "text-line-check-1"})
    assert r.status_code == 200
    line = text_line(server, "request_id=text-line-check-1")
    assert " INFO deepserve.requests: request " in line
    assert "method=GET path=/v1/models dialect=openai model=" not in line  # None fields are left out
    assert "method=GET path=/v1/models dialect=openai status=200" in line
    assert server.api_key not in server.log()


# ---- the formatters alone ----------------------------------------------------------------------------
def _record(msg: str, args: tuple = (), **extra) -> logging.LogRecord:
    record = logging.LogRecord("deepserve.requests", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_formatter_puts_fields_at_the_top_level_and_keeps_its_own_keys():
    out = json.loads(JsonFormatter().format(_record("request", fields={"status": 200, "msg": "not mine",
                                                                       "prompt": {"messages": []}})))
    assert out["msg"] == "request" and out["status"] == 200 and out["prompt"] == {"messages": []}
    assert out["level"] == "info" and out["logger"] == "deepserve.requests" and out["ts"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exc"]


def test_text_formatter_quotes_what_needs_quoting():
    line = TextFormatter().format(_record("request", fields={"path": "/v1/models", "model": None,
                                                             "finish_reason": "a b", "status": 200}))
    assert line.endswith('request path=/v1/models finish_reason="a b" status=200')


def test_strip_query_string_rewrites_uvicorns_access_arguments():
    record = _record('%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5", "GET", "/v1/models?key=sk-x", "1.1", 200))
    assert StripQueryString().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /v1/models HTTP/1.1" 200'
