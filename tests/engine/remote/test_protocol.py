"""Upstream stream chunks → TokenDeltas, and request bodies, on chunks shaped as vLLM / SGLang send them."""

from __future__ import annotations

import json

import pytest

from deepserve.engine.remote.protocol import StreamTranslator, UpstreamProtocolError, request_body
from deepserve.engine.types import (
    FinishReason, GenerateRequest, Generation, ReasoningFormat, ReasoningParams, SamplingParams, TextPrompt,
)


def chat_request(fmt: ReasoningFormat = ReasoningFormat.DEEPSEEK, **sampling) -> GenerateRequest:
    params = SamplingParams(reasoning=ReasoningParams(format=fmt), **sampling)
    return GenerateRequest(TextPrompt(messages=[{"role": "user", "content": "hi"}], num_tokens_bound=80), params)


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None, text: str | None = None) -> str:
    body: dict = {"id": "x", "choices": []}
    if delta is not None or finish is not None or text is not None:
        choice: dict = {"index": 0, "finish_reason": finish}
        if text is not None:
            choice["text"] = text
        else:
            choice["delta"] = delta or {}
        body["choices"] = [choice]
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
         "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 2}}


def run(translator: StreamTranslator, payloads: list[str]):
    deltas = [d for d in (translator.feed(p) for p in payloads) if d is not None]
    return deltas, translator.done()


R1_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "Let me"}),
    chunk({"reasoning_content": " think."}),
    chunk({"content": "Hello"}),
    chunk({"content": " there"}),
    chunk({"content": "!"}, finish="stop"),
    chunk(usage=USAGE),
]


def test_deepseek_format_keeps_reasoning_apart_and_the_usage_is_the_upstreams():
    deltas, final = run(StreamTranslator(chat_request()), R1_STREAM)
    assert "".join(d.reasoning_text for d in deltas) == "Let me think."
    assert "".join(d.text for d in deltas) == "Hello there!"
    assert [d.num_tokens for d in deltas] == [1, 1, 1, 1, 1]
    assert (final.finish_reason, final.num_prompt_tokens, final.num_cached_tokens, final.num_generated_tokens,
            final.num_reasoning_tokens) == (FinishReason.STOP, 12, 8, 5, 2)
    assert final.num_tokens == 0  # every token was already counted as it arrived


def test_raw_format_writes_the_think_block_inline_and_hidden_drops_it_but_counts_it():
    deltas, _ = run(StreamTranslator(chat_request(ReasoningFormat.RAW)), R1_STREAM)
    assert "".join(d.text for d in deltas) == "<think>\nLet me think.</think>\n\nHello there!"
    deltas, final = run(StreamTranslator(chat_request(ReasoningFormat.HIDDEN)), R1_STREAM)
    assert "".join(d.text for d in deltas) == "Hello there!"
    assert sum(d.num_tokens for d in deltas) == 5 and final.num_generated_tokens == 5
    assert not any(d.reasoning_text for d in deltas)


def test_newer_vllm_reasoning_field_is_read_too():
    deltas, _ = run(StreamTranslator(chat_request()), [chunk({"reasoning": "hm"}), chunk({"content": "ok"}, "stop"),
                                                       chunk(usage=USAGE)])
    assert [d.reasoning_text for d in deltas] == ["hm", ""]


def test_tool_call_fragments_become_whole_calls_on_the_last_delta():
    translator = StreamTranslator(chat_request())
    payloads = [
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "now", "arguments": "{}"}}]}),
        chunk({}, finish="tool_calls"),
        chunk(usage={"prompt_tokens": 30, "completion_tokens": 14}),
    ]
    deltas, final = run(translator, payloads)
    assert final.finish_reason == FinishReason.TOOL_CALLS
    assert [(c.id, c.name, json.loads(c.arguments), c.index) for c in final.tool_calls] == [
        ("call_a", "get_weather", {"city": "Paris"}, 0), ("call_b", "now", {}, 1)]
    assert sum(d.num_tokens for d in deltas) + final.num_tokens == 14


def test_continuous_usage_gives_exact_running_counts_and_the_prompt_early():
    translator = StreamTranslator(chat_request())
    first = translator.feed(chunk({"content": "ab"}, usage={"prompt_tokens": 9, "completion_tokens": 3}))
    second = translator.feed(chunk({"content": "c"}, usage={"prompt_tokens": 9, "completion_tokens": 4}))
    assert (first.num_tokens, second.num_tokens, second.num_prompt_tokens) == (3, 1, 9)
    broken = translator.failed("connection reset")
    assert (broken.finish_reason, broken.num_prompt_tokens, broken.num_generated_tokens) == (FinishReason.ERROR, 9, 4)
    assert broken.error == "connection reset"


def test_a_stream_cut_without_usage_is_charged_one_token_per_chunk_and_no_prompt():
    translator = StreamTranslator(chat_request())
    for word in ("a", "b", "c"):
        translator.feed(chunk({"content": word}))
    broken = translator.failed("gone")
    assert (broken.num_prompt_tokens, broken.num_generated_tokens) == (0, 3)


def test_a_stream_without_usage_or_finish_is_a_protocol_error():
    translator = StreamTranslator(chat_request())
    translator.feed(chunk({"content": "a"}, finish="stop"))
    with pytest.raises(UpstreamProtocolError, match="usage"):
        translator.done()
    translator = StreamTranslator(chat_request())
    translator.feed(chunk(usage=USAGE))
    with pytest.raises(UpstreamProtocolError, match="finish_reason"):
        translator.done()


def test_error_events_and_garbage_are_protocol_errors():
    translator = StreamTranslator(chat_request())
    with pytest.raises(UpstreamProtocolError, match="out of memory"):
        translator.feed(json.dumps({"error": {"message": "out of memory", "code": 500}}))
    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        translator.feed("{oops")


def test_completions_text_and_logprobs():
    request = GenerateRequest(TextPrompt(text="Once", num_tokens_bound=6), SamplingParams(logprobs=True, top_logprobs=1))
    logprobs = {"tokens": [" upon"], "token_logprobs": [-0.5], "top_logprobs": [{" upon": -0.5}], "text_offset": [0]}
    translator = StreamTranslator(request)
    delta = translator.feed(json.dumps({"choices": [{"index": 0, "text": " upon", "logprobs": logprobs,
                                                     "finish_reason": None}]}))
    assert delta.text == " upon" and delta.num_tokens == 1
    assert (delta.logprobs[0].token, delta.logprobs[0].logprob, delta.logprobs[0].top) == (
        " upon", -0.5, [(" upon", b" upon", -0.5)])


def test_completions_logprobs_in_llama_servers_chat_shape():
    """llama-server answers /v1/completions logprobs as chat's {"content": [...]}; they were lost (empty)."""
    request = GenerateRequest(TextPrompt(text="Once", num_tokens_bound=6), SamplingParams(logprobs=True, top_logprobs=1))
    logprobs = {"content": [{"id": 5, "token": " upon", "bytes": [32, 117, 112, 111, 110], "logprob": -0.5,
                             "top_logprobs": [{"id": 5, "token": " upon", "bytes": [32, 117, 112, 111, 110],
                                               "logprob": -0.5}]}]}
    delta = StreamTranslator(request).feed(json.dumps({"choices": [{"index": 0, "text": " upon", "logprobs": logprobs,
                                                                    "finish_reason": None}]}))
    assert (delta.logprobs[0].token, delta.logprobs[0].logprob, delta.logprobs[0].top) == (
        " upon", -0.5, [(" upon", b" upon", -0.5)])


def test_request_bodies_forward_sampling_tools_and_response_format():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = GenerateRequest(
        TextPrompt(messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice="auto", num_tokens_bound=99),
        SamplingParams(temperature=0.6, top_p=0.95, top_k=40, max_tokens=32, stop=["\n\n"], seed=7,
                       response_format={"type": "json_object"}, reasoning=ReasoningParams()),
    )
    body = request_body(request, "deepseek-ai/DeepSeek-R1", {"chat_template_kwargs": {"thinking": True}})
    assert body["model"] == "deepseek-ai/DeepSeek-R1" and body["stream"] is True
    assert body["stream_options"]["include_usage"] is True
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"], body["stop"], body["seed"]) == (
        0.6, 0.95, 40, 32, ["\n\n"], 7)
    assert body["tools"] == tools and body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_object"} and body["n"] == 1
    assert body["chat_template_kwargs"] == {"thinking": True}
    assert "repetition_penalty" not in body and "min_p" not in body and "prompt" not in body
    ids = request_body(GenerateRequest([1, 2, 3], SamplingParams()), "m")
    assert ids["prompt"] == [1, 2, 3] and "messages" not in ids


def test_logit_bias_is_forwarded_with_string_token_ids():
    body = request_body(chat_request(logit_bias={42: -100.0, 7: 5.0}), "up-model")
    assert body["logit_bias"] == {"42": -100.0, "7": 5.0}
    assert "logit_bias" not in request_body(chat_request(), "up-model")


@pytest.mark.parametrize("generation, fields", [
    (Generation.CONTINUE, {"continue_final_message": True, "add_generation_prompt": False}),
    (Generation.NONE, {"add_generation_prompt": False}),
    (Generation.OPEN, {}),
])
def test_how_a_chat_ends_is_sent_in_vllms_fields(generation, fields):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel", "prefix": True}]
    body = request_body(GenerateRequest(TextPrompt(messages=messages, generation=generation, num_tokens_bound=9),
                                        SamplingParams()), "m")
    assert {k: body[k] for k in ("continue_final_message", "add_generation_prompt") if k in body} == fields
    assert body["messages"] == messages  # DeepSeek's own API reads the last message's prefix
