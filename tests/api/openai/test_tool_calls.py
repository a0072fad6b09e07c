"""Tool calls through the real engine on the bundled SmolLM2 (ChatML: the Hermes `<tool_call>` syntax), read
with the openai SDK's own types. A forced `tool_choice` (a named function, or required) is a grammar, so
even this small model's call always parses."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.server import RunningServer, start_server

WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                      "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_named_function_is_always_called(client, server):
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=60, seed=1,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}}, n=2)
    assert r.usage.completion_tokens <= 120
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)


def test_required_calls_one_of_the_tools_and_streams_as_tool_call_deltas(client, server):
    stream = client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                            tool_choice="required", parallel_tool_calls=False, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    deltas = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0]
    (call,) = deltas
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        jsonschema.validate(arguments, WEATHER_PARAMETERS)
    else:
        assert arguments == {}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage.completion_tokens > 0
    # content null from the role chunk on, as OpenAI streams a forced call: accumulated, it is the whole answer's None
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None
    from openai.lib.streaming.chat import ChatCompletionStreamState

    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(c)
    assert state.current_completion_snapshot.choices[0].message.content is None


def test_a_forced_call_cut_by_max_tokens_is_the_call_as_far_as_it_got(client, server):
    """OpenAI returns a call cut by max_tokens as a tool call whose arguments are not JSON yet; never its markup."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=20,
                                       temperature=0, tool_choice=named)
    (choice,) = r.choices
    assert choice.finish_reason == "length" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and "<tool_call>" not in call.function.arguments
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)  # cut: not JSON yet
    # cut inside the name: nothing to call, and no markup either
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=14,
                                       temperature=0, tool_choice=named)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.content


def test_required_makes_one_call_unless_parallel_calls_are_asked_for(client, server):
    """As llama-server: a forced call is one call unless parallel_tool_calls is true. With OpenAI's default (several)
    this small model repeated its call until max_tokens cut it: finish_reason length, the tool run twice."""
    now = {"type": "function", "function": {"name": "now", "description": "Get the current time",
                                            "parameters": {"type": "object", "properties": {}}}}
    question = [{"role": "user", "content": "What time is it?"}]
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=server.model, messages=question, tools=[now], tool_choice="required",
                                           max_tokens=64, temperature=0.7, seed=seed)
        (choice,) = r.choices
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert r.usage.completion_tokens < 64
    r = client.chat.completions.create(model=server.model, messages=question, tools=[now], tool_choice="required",
                                       max_tokens=64, temperature=0, parallel_tool_calls=True)
    assert len(r.choices[0].message.tool_calls) >= 1  # asked for: more than one may come


def test_allowed_tools_required_calls_only_an_allowed_one(client, server):
    """tool_choice {"type": "allowed_tools"} as the openai SDK types it: with both tools offered and only get_time
    allowed, mode required always calls get_time, though the question is about the weather."""
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=40, seed=2, n=2, parallel_tool_calls=False,
        tool_choice={"type": "allowed_tools", "allowed_tools": {
            "mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}})
    for choice in r.choices:
        (call,) = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and call.function.name == "get_time"
        assert json.loads(call.function.arguments) == {}


def test_none_means_no_call_and_a_tool_result_goes_back_to_the_model(client, server):
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    first = client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    follow_up = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees celsius."}]
    r = client.chat.completions.create(model=server.model, messages=follow_up, tools=TOOLS, max_tokens=12,
                                       tool_choice="none", temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    without_result = client.chat.completions.create(model=server.model, messages=follow_up[:-1], tools=TOOLS,
                                                    max_tokens=1, tool_choice="none")
    assert r.usage.prompt_tokens > without_result.usage.prompt_tokens + 5  # the tool's answer is in the prompt


def test_bad_tool_choice_is_a_400(client, server):
    try:
        client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "launch_rocket"}})
    except openai.BadRequestError as error:
        assert "launch_rocket" in error.body["message"] and error.body["param"] == "tool_choice"
    else:
        raise AssertionError("expected a 400")


def test_the_sdk_types_validate_every_body_and_chunk_strictly(http, server):
    """Beyond the SDK's lenient parsing: each body and chunk passes pydantic validation of the SDK's types."""
    body = {"model": server.model, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 60, "seed": 5,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    completion = ChatCompletion.model_validate(http.post("/v1/chat/completions", json=body).json())
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.tool_calls[0].function.name == "get_weather"
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(line)) for line in lines[:-1]]
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ---- DeepSeek's own call syntax, on the tiny random-weight DeepSeek-V3/R1 (deepseek2) model -----------------------
# Its vocabulary has the tool-call control tokens and `<think>`; its template is R1's (the prompt opens the block).


@pytest.fixture(scope="module")
def v3_server(tiny_ggufs) -> RunningServer:
    running = start_server("--model-path", tiny_ggufs["deepseek-r1"], "--model-id", "tiny-deepseek-v3",
                           "--parallel", "2", "--ctx-size", "1024", "--threads", "1")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def v3(v3_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=v3_server.base_url, api_key=v3_server.api_key, max_retries=0)


V3_REQUEST = {"model": "tiny-deepseek-v3", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 160, "seed": 3,
              "temperature": 0.7, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
V3_EXTRA = {"max_reasoning_tokens": 2, "reasoning_format": "deepseek"}


def test_a_reasoning_model_thinks_then_calls_in_deepseek_syntax(v3):
    r = v3.chat.completions.create(**V3_REQUEST, extra_body=V3_EXTRA)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert (choice.message.model_extra or {}).get("reasoning_content")  # thought first, freely
    assert r.usage.completion_tokens_details.reasoning_tokens == 2
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)

    # streamed: reasoning deltas, then the whole call in one delta; the SDK's helper rebuilds the message
    with v3.chat.completions.stream(**V3_REQUEST, extra_body=V3_EXTRA) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    order = []
    for chunk in chunks:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None and (delta.model_extra or {}).get("reasoning_content"):
            order.append("r")
        if delta is not None and delta.tool_calls:
            order.append("t")
    assert order == sorted(order, key="rt".index) and order.count("t") == 1
    assert final.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in final.choices[0].message.tool_calls] == ["get_weather"]
    assert final.choices[0].message.tool_calls[0].function.arguments == call.function.arguments  # same seed
    assert not final.choices[0].message.content  # the markers never show as content


def test_a_deepseek_call_and_its_result_go_back_in_deepseek_syntax(v3):
    first = v3.chat.completions.create(**V3_REQUEST, extra_body=V3_EXTRA)
    call = first.choices[0].message.tool_calls[0]
    history = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True)]
    assert "reasoning_content" in history[-1]  # the SDK sends it back; deepserve drops it before templating
    with_result = [*history, {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."}]
    r = v3.chat.completions.create(model="tiny-deepseek-v3", messages=with_result, tools=TOOLS, max_tokens=4,
                                   extra_body={"ignore_eos": True})
    without = v3.chat.completions.create(model="tiny-deepseek-v3", messages=history, tools=TOOLS, max_tokens=1)
    assert r.usage.prompt_tokens > without.usage.prompt_tokens + 5
    assert r.choices[0].finish_reason == "length"
