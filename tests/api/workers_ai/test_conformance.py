"""Cloudflare Workers AI through the real engine and real HTTP: the official `cloudflare` SDK for the happy
paths, httpx for every documented error code and the edges of every range."""

from __future__ import annotations

import json

import cloudflare
import httpx
import openai
import pytest
from cloudflare import Cloudflare

from deepserve.api.workers_ai import render
from deepserve.errors import EngineError
from tests.conftest import engine_stats

ACCOUNT = "acc-123"
PROMPT = "Name three colours."
MESSAGES = [{"role": "user", "content": PROMPT}]
ENVELOPE_KEYS = {"result", "success", "errors", "messages"}


@pytest.fixture()
def cf(server) -> Cloudflare:
    return Cloudflare(api_token=server.api_key, base_url=server.root_url + "/client/v4", max_retries=0)


def run_path(model: str) -> str:
    return f"/client/v4/accounts/{ACCOUNT}/ai/run/{model}"


def assert_usage(usage: dict, max_tokens: int) -> None:
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def assert_cf_error(r: httpx.Response, status: int, code: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ENVELOPE_KEYS
    assert body["result"] is None and body["success"] is False and body["messages"] == []
    (error,) = body["errors"]
    assert error["code"] == code and error["message"]
    return error["message"]


def sse_payloads(lines) -> list:
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# ---- the SDK -----------------------------------------------------------------------------------------


def test_sdk_prompt_goes_through_the_chat_template_and_matches_the_same_one_message(cf, server):
    prompted = cf.ai.run(server.model, account_id=ACCOUNT, prompt=PROMPT, max_tokens=8, temperature=0)
    assert prompted["response"].strip()
    assert_usage(prompted["usage"], 8)
    chatted = cf.ai.run(server.model, account_id=ACCOUNT, messages=MESSAGES, max_tokens=8, temperature=0)
    assert chatted == prompted  # raw=false wraps the prompt as one user message


def test_sdk_raw_prompt_has_no_chat_template(cf, server):
    raw = cf.ai.run(server.model, account_id=ACCOUNT, prompt=PROMPT, raw=True, max_tokens=4, temperature=0)
    templated = cf.ai.run(server.model, account_id=ACCOUNT, prompt=PROMPT, raw=False, max_tokens=4, temperature=0)
    assert isinstance(raw["response"], str)
    assert raw["usage"]["prompt_tokens"] <= 8  # the five words alone
    assert templated["usage"]["prompt_tokens"] > raw["usage"]["prompt_tokens"] + 5  # role markers, system text


def test_sdk_messages_with_system_prompt(cf, server):
    messages = [{"role": "system", "content": "You answer in one word."}, *MESSAGES]
    r = cf.ai.run(server.model, account_id=ACCOUNT, messages=messages, max_tokens=6, temperature=0)
    assert r["response"].strip()
    assert_usage(r["usage"], 6)


def test_sdk_catalog_style_model_name_with_slashes(cf, server):
    r = cf.ai.run(f"@cf/{server.model}", account_id=ACCOUNT, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r["response"] and r["usage"]["completion_tokens"] <= 4


def test_sdk_stream_sends_response_deltas_then_usage_then_done(cf, server, http):
    full = cf.ai.run(server.model, account_id=ACCOUNT, prompt=PROMPT, max_tokens=10, temperature=0)
    direct_before = engine_stats(http)["num_direct_tokens"]
    # The SDK exposes an SSE body through with_streaming_response (plain .run() tries to unwrap it as JSON).
    with cf.ai.with_streaming_response.run(
        server.model, account_id=ACCOUNT, prompt=PROMPT, max_tokens=10, temperature=0, stream=True
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(list(response.iter_lines()))
    *deltas, final = events
    assert deltas and all(set(e) == {"response"} and e["response"] for e in deltas)
    assert "".join(e["response"] for e in deltas) == full["response"]
    assert final == {"response": "", "usage": full["usage"]}
    assert engine_stats(http)["num_direct_tokens"] > direct_before  # written by the engine thread (api/direct.py)


def test_sdk_bad_key_is_authentication_error_10000(server):
    bad = Cloudflare(api_token="wrong", base_url=server.root_url + "/client/v4", max_retries=0)
    with pytest.raises(cloudflare.AuthenticationError) as info:
        bad.ai.run(server.model, account_id=ACCOUNT, prompt=PROMPT)
    assert info.value.status_code == 401
    assert info.value.body["errors"][0]["code"] == render.AUTHENTICATION_ERROR == 10000


def test_sdk_unknown_model_is_5007(cf):
    with pytest.raises(cloudflare.BadRequestError) as info:
        cf.ai.run("@cf/deepseek-ai/no-such-model", account_id=ACCOUNT, prompt=PROMPT)
    error = info.value.body["errors"][0]
    assert error["code"] == 5007 and "No such model @cf/deepseek-ai/no-such-model" in error["message"]


# ---- shapes and parameters over plain HTTP ------------------------------------------------------------


def test_success_envelope_is_exactly_cloudflares(http, server):
    r = http.post(run_path(server.model), json={"prompt": PROMPT, "max_tokens": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body == {"result": body["result"], "success": True, "errors": [], "messages": []}
    assert set(body["result"]) == {"response", "usage"}
    # Cloudflare's three counts, plus the reasoning count that every dialect's usage carries
    assert set(body["result"]["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                            "completion_tokens_details"}
    assert body["result"]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert_usage(body["result"]["usage"], 3)


def test_seed_makes_sampling_reproducible(http, server):
    body = {"prompt": "Tell me a story.", "max_tokens": 8, "temperature": 1.5, "seed": 424242}
    first = http.post(run_path(server.model), json=body).json()["result"]["response"]
    again = http.post(run_path(server.model), json=body).json()["result"]["response"]
    assert first == again


EDGES = [
    ("temperature", 0, 5, [-0.1, 5.1]),
    ("top_p", 0, 2, [-0.1, 2.1]),
    ("top_k", 1, 50, [0, 51]),
    ("seed", 1, 9_999_999_999, [0, 10_000_000_000]),
    ("repetition_penalty", 0, 2, [-0.1, 2.1]),
    ("frequency_penalty", 0, 2, [-0.1, 2.1]),
    ("presence_penalty", 0, 2, [-0.1, 2.1]),
]


@pytest.mark.parametrize("field,low,high,outside", EDGES, ids=[e[0] for e in EDGES])
def test_range_edges_are_accepted_and_just_outside_is_5004_naming_the_range(http, server, field, low, high, outside):
    for value in (low, high):
        r = http.post(run_path(server.model), json={"prompt": PROMPT, "max_tokens": 1, field: value})
        assert r.status_code == 200, (field, value, r.text)
        assert r.json()["result"]["usage"]["completion_tokens"] == 1
    for value in outside:
        r = http.post(run_path(server.model), json={"prompt": PROMPT, "max_tokens": 1, field: value})
        message = assert_cf_error(r, 400, render.INVALID_DATA)
        assert field in message and f"between {low} and {high}" in message


def test_text_length_limit_is_4096_characters(http, server):
    at_limit = "hello " * 682 + "hell"  # 4096 characters, about 700 tokens
    assert len(at_limit) == 4096
    r = http.post(run_path(server.model), json={"prompt": at_limit, "raw": True, "max_tokens": 1})
    assert r.status_code == 200, r.text
    message = assert_cf_error(
        http.post(run_path(server.model), json={"prompt": at_limit + "o", "max_tokens": 1}), 400, 5004
    )
    assert "prompt" in message and "4096" in message
    too_long = [{"role": "user", "content": "x" * 4097}]
    message = assert_cf_error(http.post(run_path(server.model), json={"messages": too_long}), 400, 5004)
    assert "messages.0.content" in message and "4096" in message


@pytest.mark.parametrize(
    "body",
    [{}, {"prompt": PROMPT, "messages": MESSAGES}, {"messages": []}, {"prompt": PROMPT, "max_tokens": 0},
     {"messages": [{"role": "user"}]}],
    ids=["neither", "both", "no-messages", "max-tokens-0", "no-content"],
)
def test_invalid_input_is_5004(http, server, body):
    assert_cf_error(http.post(run_path(server.model), json=body), 400, render.INVALID_DATA)


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None],
                         ids=["curl-d", "text-plain", "unlabelled"])
def test_the_quick_starts_curl_body_is_json_whatever_its_content_type(http, server, content_type):
    """Cloudflare's REST quick-start: `curl -H "Authorization: Bearer …" -d '{"prompt": …}'` (curl -d labels
    the body a form)."""
    headers = {"Content-Type": content_type} if content_type else {}
    http.headers.pop("Content-Type", None)
    r = http.post(run_path(server.model), content=json.dumps({"prompt": PROMPT, "max_tokens": 2}), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True and r.json()["result"]["usage"]["completion_tokens"] == 2
    bad = http.post(run_path(server.model), content=b'{"prompt": ', headers=headers)
    assert "JSON" in assert_cf_error(bad, 400, 5004)


def test_malformed_json_is_5004(http, server):
    r = http.post(run_path(server.model), content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert "JSON" in assert_cf_error(r, 400, 5004)


def test_prompt_beyond_the_context_is_5004(http, server):
    r = http.post(run_path(server.model), json={"prompt": PROMPT, "max_tokens": 5000})
    assert "context length" in assert_cf_error(r, 400, 5004)


# ---- every documented error code -----------------------------------------------------------------------


def test_missing_and_wrong_key_are_10000(server):
    url = server.root_url + run_path(server.model)
    assert_cf_error(httpx.post(url, json={"prompt": PROMPT}), 401, 10000)
    assert_cf_error(httpx.post(url, json={"prompt": PROMPT}, headers={"Authorization": "Bearer nope"}), 401, 10000)


def test_unknown_model_is_5007_even_with_a_catalog_prefix(http):
    for name in ("no-such-model", "@hf/thebloke/no-such-model", "@cf/deepseek-ai/deepseek-math-7b-base-nope"):
        assert f"No such model {name}" in assert_cf_error(http.post(run_path(name), json={"prompt": PROMPT}), 400, 5007)


def test_request_too_large_is_3006(http, server):
    r = http.post(run_path(server.model), json={"prompt": "x" * (5 * 1024 * 1024)})
    assert_cf_error(r, 413, render.REQUEST_TOO_LARGE)


def test_request_too_large_without_content_length_is_3006_too(http, server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    r = http.post(run_path(server.model), content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_cf_error(r, 413, render.REQUEST_TOO_LARGE)


def test_full_queue_is_3040_out_of_capacity(full_queue_server):
    url = full_queue_server.root_url + run_path(full_queue_server.model)
    r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 1},
                   headers={"Authorization": f"Bearer {full_queue_server.api_key}"}, timeout=60)
    assert_cf_error(r, 429, render.OUT_OF_CAPACITY)
    assert int(r.headers["Retry-After"]) >= 1


def test_wrong_method_and_unknown_route_use_the_v4_envelope(http, server):
    r = http.get(run_path(server.model))
    assert_cf_error(r, 405, render.METHOD_NOT_ALLOWED)
    assert r.headers["Allow"] == "POST"
    assert_cf_error(http.post(f"/client/v4/accounts/{ACCOUNT}/ai/nothing"), 404, render.NO_ROUTE)


def test_engine_failure_is_a_500_in_the_v4_envelope():
    response = render.error_response(EngineError("The engine failed while generating: boom"))
    assert response.status_code == 500
    body = json.loads(response.body)
    assert body["success"] is False and body["errors"][0]["message"].endswith("boom")
    assert render.ACCOUNT_LIMITED == 3036  # billing's answer for an exhausted balance (429)


# ---- the OpenAI-format twin ---------------------------------------------------------------------------


def test_openai_twin_answers_in_openai_shape(server):
    client = openai.OpenAI(
        base_url=f"{server.root_url}/client/v4/accounts/{ACCOUNT}/ai/v1", api_key=server.api_key, max_retries=0
    )
    model = f"@cf/{server.model}"
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == model
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert 0 < r.usage.completion_tokens <= 6
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_openai_twin_errors_use_the_v4_envelope(http, server):
    path = f"/client/v4/accounts/{ACCOUNT}/ai/v1/chat/completions"
    assert_cf_error(http.post(path, json={"model": server.model, "messages": []}), 400, 5004)
    assert_cf_error(http.post(path, json={"model": "@cf/nope", "messages": MESSAGES}), 400, 5007)


def test_openapi_documents_both_routes(http):
    paths = http.get("/openapi.json").json()["paths"]
    run = paths["/client/v4/accounts/{account_id}/ai/run/{model_name}"]["post"]
    assert "requestBody" in run
    assert "/client/v4/accounts/{account_id}/ai/v1/chat/completions" in paths


def test_the_default_max_tokens_shrinks_to_the_room_the_window_has(cf, server, http):
    """No max_tokens: the dialect's default (256) is not the client's, so a prompt that fits the window (1,024 here)
    with less than 256 tokens to spare is answered, not refused for tokens it never asked for."""
    messages = [{"role": "user", "content": "word " * 290}, {"role": "assistant", "content": "word " * 290},
                {"role": "user", "content": "word " * 290}]
    r = cf.ai.run(server.model, account_id=ACCOUNT, messages=messages, temperature=0)
    usage = r["usage"]
    assert 1024 - 256 < usage["prompt_tokens"] < 1024
    assert 0 < usage["completion_tokens"] <= 1024 - usage["prompt_tokens"]
    too_long = [{"role": "user", "content": "word " * 800}] * 2  # past the window: still refused, for the prompt
    assert "your prompt is" in assert_cf_error(http.post(run_path(server.model), json={"messages": too_long}), 400, 5004)
