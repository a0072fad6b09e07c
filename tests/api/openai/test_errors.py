"""Bad input gets a clear OpenAI-style error and changes nothing."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.conftest import engine_stats
from tests.server import start_server

MESSAGES = [{"role": "user", "content": "Hi"}]


def test_bad_key_is_401(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=server.model, messages=MESSAGES)
    assert info.value.body["code"] == "invalid_api_key"


def test_missing_key_is_401(server):
    r = httpx.post(f"{server.base_url}/chat/completions", json={"model": server.model, "messages": MESSAGES})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_unknown_model_is_404_and_names_the_available_ones(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="deepseek-nope", messages=MESSAGES)
    error = info.value.body
    assert error["code"] == "model_not_found" and server.model in error["message"]


def test_prompt_longer_than_the_context_is_400_stating_both_numbers(client, server, http):
    before = engine_stats(http)["num_requests_finished"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "word " * 2000}])
    message = info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded"
    # OpenAI's words: the messages are to blame (max_tokens was not even sent), with both numbers
    assert info.value.body["param"] == "messages" and "max_tokens" not in message
    assert "maximum context length is 1024 tokens" in message
    assert int(re.search(r"your messages resulted in (\d+) tokens", message).group(1)) > 2000
    assert engine_stats(http)["num_requests_finished"] == before  # nothing ran


def test_a_completion_prompt_longer_than_the_context_blames_the_prompt(client, server, http):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="word " * 2000, max_tokens=5)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "prompt"
    assert "maximum context length is 1024 tokens" in info.value.body["message"]
    assert int(re.search(r"your prompt is (\d+) tokens", info.value.body["message"]).group(1)) >= 2000


def test_max_tokens_beyond_the_context_is_400(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=5000)
    assert "5000 for the completion" in info.value.body["message"]


@pytest.mark.parametrize(
    "field,value",
    [("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 17),
     ("max_tokens", 0), ("frequency_penalty", 2.1), ("presence_penalty", -2.1), ("top_logprobs", 21),
     ("min_p", 1.5), ("repetition_penalty", 0)],
)
def test_out_of_range_parameters_are_400_naming_the_field(http, server, field, value):
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": MESSAGES, field: value})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field and field in error["message"]


def test_edges_of_ranges_are_accepted(http, server):
    for field, value in [("temperature", 0), ("temperature", 2), ("top_p", 1), ("n", 2), ("frequency_penalty", -2)]:
        r = http.post(
            "/v1/chat/completions", json={"model": server.model, "messages": MESSAGES, "max_tokens": 1, field: value}
        )
        assert r.status_code == 200, (field, value, r.text)


def test_unknown_fields_are_ignored(http, server):
    r = http.post(
        "/v1/chat/completions",
        json={"model": server.model, "messages": MESSAGES, "max_tokens": 1, "some_future_field": {"x": 1}},
    )
    assert r.status_code == 200


def test_malformed_json_is_400(http):
    r = http.post("/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def test_a_json_body_without_a_json_content_type_is_still_json(http, server):
    body = json.dumps({"model": server.model, "messages": MESSAGES, "max_tokens": 1})
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):
        r = http.post("/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text


def test_empty_messages_is_400(http, server):
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_oversized_body_is_413(http, server):
    r = http.post(
        "/v1/chat/completions",
        json={"model": server.model, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]},
    )
    assert r.status_code == 413
    assert "limit" in r.json()["error"]["message"]


def test_oversized_chunked_body_is_413_after_the_key_is_checked(http, server):
    """No Content-Length (a streamed upload): the limit is found while the body is read, and the answer is still
    413, or 401 for a bad key, not a 400 "error parsing the body"."""
    def chunks():
        yield b'{"model": "' + server.model.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(5):
            yield b"x" * (1024 * 1024)
        yield b'"}]}'

    r = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large" and "limit" in r.json()["error"]["message"]
    bad = http.post("/v1/chat/completions", content=chunks(),
                    headers={"Content-Type": "application/json", "Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    # the Idempotency-Key middleware reads the body before the route: the limit is still the route's 413
    keyed = http.post("/v1/chat/completions", content=chunks(),
                      headers={"Content-Type": "application/json", "Idempotency-Key": "too-large-1"})
    assert keyed.status_code == 413, keyed.text


def test_unknown_route_is_404_in_openai_envelope(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_image_content_part_is_rejected_clearly(http, server):
    r = http.post(
        "/v1/chat/completions",
        json={"model": server.model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    )
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_stream_must_be_a_boolean_and_stream_options_needs_a_stream(http, server):
    base = {"model": server.model, "messages": MESSAGES, "max_tokens": 1}
    for extra, param in (({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}}, "stream_options"),
                         ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options")):
        r = http.post("/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 400 and param in r.json()["error"]["message"] + str(r.json()["error"]["param"]), r.text


def test_an_empty_completion_prompt_names_the_prompt(http, server):
    r = http.post("/v1/completions", json={"model": server.model, "prompt": "", "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_browsers_preflight_and_call_from_another_origin_are_allowed(http, server):
    origin = {"Origin": "http://localhost:5173"}
    preflight = http.options("/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] in ("*", origin["Origin"])
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    r = http.post("/v1/chat/completions", headers=origin,
                  json={"model": server.model, "messages": MESSAGES, "max_tokens": 1})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("path,body,headers", [
    ("/v1/chat/completions", b'{"model": ', {"Authorization": "Bearer wrong"}),
    ("/client/v4/accounts/a/ai/run/m", b'{"prompt": ', {"Authorization": "Bearer wrong"}),
    ("/api/v1", b'{"model": ', {"Authorization": "Bearer wrong"}),
    ("/v1/deepseek-reasoner", b'{"messages": ', {"x-api-key": "wrong"}),
    ("/v1/chat/completions", b'{"model": ', {}),
], ids=["openai", "workers-ai", "dataoorts", "segmind", "openai-no-key"])
def test_a_bad_key_is_401_even_when_the_body_is_not_json_either(server, path, body, headers):
    """The providers look at the key first; FastAPI parses the body before the route's key check runs."""
    r = httpx.post(server.root_url + path, content=body, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 401, r.text


def test_a_lone_surrogate_in_a_message_is_a_replacement_character_not_a_500(http, server):
    body = '{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "a\\ud800b"}]}' % server.model
    r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    same = http.post("/v1/chat/completions", json={"model": server.model, "max_tokens": 1,
                                                   "messages": [{"role": "user", "content": "a\ufffdb"}]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == same.json()["usage"]["prompt_tokens"]


def test_more_choices_than_the_queue_holds_is_a_400_not_a_retry_forever():
    running = start_server("--parallel", "2", "--max-queue", "4", "--ctx-size", "256")
    try:
        with httpx.Client(base_url=running.root_url, headers={"Authorization": f"Bearer {running.api_key}"},
                          timeout=60) as http:
            body = {"model": running.model, "messages": MESSAGES, "max_tokens": 2}
            r = http.post("/v1/chat/completions", json={**body, "n": 5})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "--max-queue" in r.text
            many = http.post("/v1/completions", json={"model": running.model, "prompt": ["a"] * 5, "max_tokens": 1})
            assert many.status_code == 400 and many.json()["error"]["param"] == "prompt"
            assert http.post("/v1/chat/completions", json={**body, "n": 4}).status_code == 200
            assert engine_stats(http)["num_waiting"] == 0
    finally:
        running.stop()


@pytest.mark.parametrize("raw", [
    '{"model": "M", "messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"5": NaN}}',
    '{"model": "M", "messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema", '
    '"json_schema": {"name": "x", "schema": {"type": "object", "properties": [1]}}}}',
    '{"model": "M", "messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema", '
    '"json_schema": {"name": "x", "schema": {"type": "object", "properties": null}}}}',
    '{"model": "M", "messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}',
])
def test_nan_and_malformed_schemas_are_400s(http, server, raw):
    r = http.post("/v1/chat/completions", content=raw.replace('"M"', f'"{server.model}"').encode())
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_null_on_a_field_with_a_default_means_the_default(http, server):
    """The openai SDK sends null for an argument passed as None (n=kwargs.get("n")), as do clients that serialise
    unset fields; OpenAI and llama-server read it as the default."""
    nulls = {"n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None, "repetition_penalty": None,
             "ignore_eos": None}
    chat = http.post("/v1/chat/completions", json={"model": server.model, "messages": MESSAGES, "max_tokens": 3,
                                                   "logprobs": None, "temperature": 0, **nulls})
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 1 and chat.json()["choices"][0]["logprobs"] is None
    text = http.post("/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 3, "echo": None,
                                              "temperature": 0, **nulls})
    assert text.status_code == 200, text.text
    assert len(text.json()["choices"]) == 1 and not text.json()["choices"][0]["text"].startswith("Hi")
    missing = http.post("/v1/chat/completions", json={"model": None, "messages": MESSAGES})  # required: still a 400
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


@pytest.mark.parametrize("tool_calls", [["x"], "x", {"a": 1}, [None], [{"function": "get_weather"}],
                                        [{"function": {"name": "get_weather", "arguments": 5}}]])
def test_a_garbled_tool_call_in_the_history_is_400_not_a_server_error(http, server, tool_calls):
    before = engine_stats(http)["num_requests_finished"]
    r = http.post("/v1/chat/completions", json={"model": server.model, "max_tokens": 3, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": tool_calls},
        {"role": "user", "content": "Hi again"}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert "messages.1" in error["message"] and "tool_calls" in error["message"]
    assert engine_stats(http)["num_requests_finished"] == before


def test_a_tool_choice_naming_its_function_by_a_string_is_400(http, server):
    r = http.post("/v1/chat/completions", json={
        "model": server.model, "max_tokens": 3, "messages": MESSAGES,
        "tools": [{"type": "function", "function": {"name": "w"}}], "tool_choice": {"type": "function", "function": "w"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
