"""Reasoning through real HTTP in every dialect, on the tiny random-weight R1-Distill-Qwen served as
deepseek-r1-32b (R1's template: the prompt opens `<think>`; the catalog's default style for this model is raw,
as seed 004 shows it).

Greedy decoding makes every request with the same prompt produce the same tokens, so each dialect is compared
with the OpenAI answer to the same request; the reasoning budget forces where the reasoning ends.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server import RunningServer, start_server

MODEL = "deepseek-r1-32b"
MESSAGES = [{"role": "user", "content": "What is two plus two?"}]
BUDGET = 4
MAX_TOKENS = 14
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "max_reasoning_tokens": BUDGET}
SMALL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
                "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def r1_server(tiny_ggufs) -> RunningServer:
    running = start_server("--model-path", tiny_ggufs["deepseek-r1-distill-qwen"], "--model-id", MODEL,
                           "--parallel", "2", "--ctx-size", "256", "--threads", "1")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def oai(r1_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=r1_server.base_url, api_key=r1_server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def http(r1_server) -> httpx.Client:
    with httpx.Client(base_url=r1_server.root_url, headers={"Authorization": f"Bearer {r1_server.api_key}"},
                      timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(oai) -> dict:
    """The OpenAI answers every other dialect is compared with, one per style (after a warm-up request, so that
    every request finds the same prompt cache and greedy decoding repeats exactly)."""
    oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
                                extra_body={"max_reasoning_tokens": BUDGET})
    out = {}
    for fmt in ("deepseek", "raw", "hidden", None):
        r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
                                        extra_body={"max_reasoning_tokens": BUDGET,
                                                    **({"reasoning_format": fmt} if fmt else {})})
        out[fmt] = r
    return out


def test_bodies_and_chunks_validate_as_the_sdk_types(http):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    body = {"model": MODEL, "messages": MESSAGES, **GREEDY, "reasoning_format": "deepseek"}
    completion = ChatCompletion.model_validate(http.post("/v1/chat/completions", json=body).json())
    assert completion.usage.completion_tokens_details.reasoning_tokens == BUDGET
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}}) as r:
        chunks = [ChatCompletionChunk.model_validate(e) for e in sse_payloads(r)]
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == BUDGET


def message_extra(r, name: str):
    return (r.choices[0].message.model_extra or {}).get(name)


def test_openai_styles(reference):
    deepseek, raw, hidden, default = (reference[k] for k in ("deepseek", "raw", "hidden", None))
    for r in (deepseek, raw, hidden, default):
        assert r.usage.completion_tokens_details.reasoning_tokens == BUDGET
        assert r.usage.completion_tokens <= MAX_TOKENS
    # deepseek: the reasoning apart, under both names; the answer alone in content
    reasoning = message_extra(deepseek, "reasoning_content")
    assert reasoning and message_extra(deepseek, "reasoning") == reasoning
    answer = deepseek.choices[0].message.content
    assert "<think>" not in answer and "</think>" not in answer and reasoning not in answer
    # raw: seed 004's shape, "<think>\n" + reasoning + "</think>" + "\n\n" + answer
    content = raw.choices[0].message.content
    assert content.startswith("<think>\n") and content.count("</think>") == 1
    block, after = content.removeprefix("<think>\n").split("</think>")
    assert block.strip() == reasoning and after.startswith("\n\n") and after.lstrip() == answer
    assert message_extra(raw, "reasoning_content") is None
    # the catalog's default for deepseek-r1-32b is raw
    assert default.choices[0].message.content == content
    # hidden: the answer only, the reasoning still counted
    assert hidden.choices[0].message.content == answer and message_extra(hidden, "reasoning_content") is None
    assert hidden.usage.completion_tokens == deepseek.usage.completion_tokens


def test_openai_stream_sends_reasoning_deltas_first_as_they_come(oai, reference):
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body={"max_reasoning_tokens": BUDGET,
                                                            "reasoning_format": "deepseek"}))
    order, reasoning, content = [], "", ""
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if extra.get("reasoning_content"):
            assert extra["reasoning"] == extra["reasoning_content"]
            order.append("r")
            reasoning += extra["reasoning_content"]
        if delta.content:
            order.append("c")
            content += delta.content
    assert order.count("r") >= 2  # streamed as generated, not in one piece at the end
    assert order == sorted(order, key="rc".index)
    ref = reference["deepseek"]
    assert reasoning == message_extra(ref, "reasoning_content") and content == ref.choices[0].message.content
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == BUDGET


def test_max_tokens_spent_thinking_is_length_with_empty_content(oai):
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=5,
                                    extra_body={"reasoning_format": "deepseek", "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == ""
    assert message_extra(r, "reasoning_content") and r.usage.completion_tokens_details.reasoning_tokens == 5


def test_reasoning_effort_none_closes_at_once(oai):
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6,
                                    reasoning_effort="none", extra_body={"reasoning_format": "deepseek"})
    assert r.usage.completion_tokens_details.reasoning_tokens == 0 and not message_extra(r, "reasoning_content")


def test_earlier_reasoning_is_not_sent_back_to_the_model(oai):
    def prompt_tokens(assistant: dict) -> int:
        r = oai.chat.completions.create(model=MODEL, max_tokens=1, messages=[
            *MESSAGES, assistant, {"role": "user", "content": "And three plus three?"}])
        return r.usage.prompt_tokens

    plain = prompt_tokens({"role": "assistant", "content": "Four."})
    assert prompt_tokens({"role": "assistant", "content": "<think>\nLong thoughts here.\n</think>\n\nFour."}) == plain
    assert prompt_tokens({"role": "assistant", "content": "Four.", "reasoning_content": "Long thoughts."}) == plain


def test_prefix_completion_continues_the_reasoning_or_the_answer(oai, http):
    """DeepSeek's prefix completion on a reasoning model: reasoning_content on the last assistant message is a
    thought to go on with (everything generated is reasoning while no answer is written), and with content too,
    the answer goes on after the closed thought."""
    thought = "Two plus two is a sum of two numbers, and the quick brown fox jumps over the lazy dog. " * 4
    thinking = {"role": "assistant", "content": "", "reasoning_content": thought, "prefix": True}  # ~100 tokens
    r = oai.chat.completions.create(model=MODEL, messages=[*MESSAGES, thinking], temperature=0, max_tokens=5,
                                    extra_body={"reasoning_format": "deepseek", "ignore_eos": True,
                                                "logit_bias": {str(think_close(http)): -100}})
    assert r.usage.completion_tokens_details.reasoning_tokens == 5 and r.choices[0].message.content == ""
    assert not message_extra(r, "reasoning_content").startswith(thought)  # only what follows the given thought
    assert prompt_text(http, [*MESSAGES, thinking]).endswith(f"<｜Assistant｜><think>\n{thought}")
    answering = {**thinking, "content": "The answer is"}
    r = oai.chat.completions.create(model=MODEL, messages=[*MESSAGES, answering], temperature=0, max_tokens=5,
                                    extra_body={"reasoning_format": "deepseek", "ignore_eos": True})
    assert r.usage.completion_tokens_details.reasoning_tokens == 0 and not message_extra(r, "reasoning_content")
    assert prompt_text(http, [*MESSAGES, answering]).endswith(f"<think>\n{thought}\n</think>\n\nThe answer is")


def prompt_text(http: httpx.Client, messages: list[dict]) -> str:
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    return http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]


def think_close(http: httpx.Client) -> int:
    (token,) = http.post("/tokenize", json={"model": MODEL, "content": "</think>"}).json()["tokens"]
    return token


def sse_payloads(r: httpx.Response) -> list:
    data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("fmt", ["deepseek", "raw", "hidden"])
def test_workers_ai(http, reference, fmt):
    ref = reference[fmt]
    path = f"/client/v4/accounts/acc/ai/run/@cf/{MODEL}"
    body = {"messages": MESSAGES, **GREEDY, "reasoning_format": fmt}
    result = http.post(path, json=body).json()["result"]
    assert result["response"] == ref.choices[0].message.content
    assert result.get("reasoning_content") == message_extra(ref, "reasoning_content") == result.get("reasoning")
    usage = result["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": BUDGET}
    assert usage["completion_tokens"] == ref.usage.completion_tokens
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        events = sse_payloads(r)
    assert events[-1]["usage"] == usage and events[-1]["response"] == ""
    kinds = ["r" if e.get("reasoning_content") else "c" for e in events[:-1] if e.get("reasoning_content") or e["response"]]
    assert kinds == sorted(kinds, key="rc".index)
    assert "".join(e["response"] for e in events) == result["response"]
    assert "".join(e.get("reasoning_content", "") for e in events) == result.get("reasoning_content", "")


def test_workers_ai_raw_prompt_without_reasoning(http):
    result = http.post(f"/client/v4/accounts/acc/ai/run/{MODEL}",
                       json={"prompt": "Hello", "raw": True, "max_tokens": 6, "temperature": 0}).json()["result"]
    assert result["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert "reasoning_content" not in result


@pytest.mark.parametrize("fmt", ["deepseek", "raw", "hidden"])
def test_dataoorts(http, reference, fmt):
    ref = reference[fmt]
    body = http.post("/api/v1", json={"model": MODEL, "data": {"messages": MESSAGES, **GREEDY,
                                                               "reasoning_format": fmt}}).json()
    assert body["success"] is True
    result = body["result"]
    assert result["response"] == ref.choices[0].message.content
    assert result.get("reasoning_content") == message_extra(ref, "reasoning_content")
    assert result["usage"]["completion_tokens_details"] == {"reasoning_tokens": BUDGET}


@pytest.mark.parametrize("fmt", ["deepseek", "raw", "hidden"])
def test_segmind(r1_server, reference, fmt):
    ref = reference[fmt]
    with httpx.Client(base_url=r1_server.root_url, headers={"x-api-key": r1_server.api_key}, timeout=120) as segmind:
        r = segmind.post("/v1/deepseek-reasoner", json={"messages": MESSAGES, **GREEDY, "reasoning_format": fmt})
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert message["content"] == ref.choices[0].message.content
        assert message.get("reasoning_content") == message_extra(ref, "reasoning_content")
        assert r.json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": BUDGET}
        with segmind.stream("POST", "/v1/deepseek-reasoner",
                            json={"messages": MESSAGES, **GREEDY, "reasoning_format": fmt, "stream": True}) as s:
            chunks = [openai.types.chat.ChatCompletionChunk.model_validate(e) for e in sse_payloads(s)]
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks if c.choices)
    assert streamed == (message.get("reasoning_content") or "")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message["content"]


def segmind_client(r1_server) -> httpx.Client:
    return httpx.Client(base_url=r1_server.root_url, headers={"x-api-key": r1_server.api_key}, timeout=120)


@pytest.mark.parametrize("fmt", ["deepseek", "raw", "hidden"])
def test_max_tokens_spent_thinking_in_every_dialect(r1_server, http, reference, fmt):
    """max_tokens = BUDGET and no budget: greedy decoding writes the reference's BUDGET reasoning tokens and is cut
    there. Every dialect answers no content (raw: the unclosed block), the reasoning counted, never an answer."""
    ref_reasoning = message_extra(reference["deepseek"], "reasoning_content")
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": BUDGET, "reasoning_format": fmt}

    def check_answer(answer: str, reasoning: str | None, usage: dict) -> None:
        if fmt == "raw":
            assert answer.startswith("<think>\n") and "</think>" not in answer
            assert answer.removeprefix("<think>\n").strip() == ref_reasoning
        else:
            assert answer == ""
        assert reasoning == (ref_reasoning if fmt == "deepseek" else None)
        assert usage["completion_tokens"] == usage["completion_tokens_details"]["reasoning_tokens"] == BUDGET

    r = http.post("/v1/chat/completions", json={**body, "model": MODEL}).json()
    assert r["choices"][0]["finish_reason"] == "length"
    check_answer(r["choices"][0]["message"]["content"], r["choices"][0]["message"].get("reasoning_content"), r["usage"])
    result = http.post(f"/client/v4/accounts/acc/ai/run/{MODEL}", json=body).json()["result"]
    check_answer(result["response"], result.get("reasoning_content"), result["usage"])
    result = http.post("/api/v1", json={"model": MODEL, "data": body}).json()["result"]
    check_answer(result["response"], result.get("reasoning_content"), result["usage"])
    with segmind_client(r1_server) as segmind:
        r = segmind.post("/v1/deepseek-reasoner", json=body).json()
    assert r["choices"][0]["finish_reason"] == "length"
    check_answer(r["choices"][0]["message"]["content"], r["choices"][0]["message"].get("reasoning_content"), r["usage"])


def test_json_schema_after_the_reasoning_in_every_dialect(r1_server, oai, http):
    """The grammar waits for `</think>`: the model reasons freely (BUDGET tokens, then the engine closes the block),
    then answers JSON that parses and validates. Greedy decoding: every dialect gives the same answer."""
    openai_format = {"type": "json_schema", "json_schema": {"name": "small", "strict": True, "schema": SMALL_SCHEMA}}
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 80, "max_reasoning_tokens": BUDGET,
            "reasoning_format": "deepseek"}
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=80,
                                    response_format=openai_format,
                                    extra_body={"max_reasoning_tokens": BUDGET, "reasoning_format": "deepseek"})
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and r.usage.completion_tokens_details.reasoning_tokens == BUDGET
    reasoning, answer = message_extra(r, "reasoning_content"), choice.message.content
    assert reasoning and not reasoning.lstrip().startswith("{")  # the reasoning was free noise, not JSON
    jsonschema.validate(json.loads(answer), SMALL_SCHEMA)

    # Workers AI with Cloudflare's shape of response_format (the schema right under json_schema)
    result = http.post(f"/client/v4/accounts/acc/ai/run/{MODEL}", json={
        **body, "response_format": {"type": "json_schema", "json_schema": SMALL_SCHEMA}}).json()["result"]
    assert (result["response"], result["reasoning_content"]) == (answer, reasoning)
    assert result["usage"]["completion_tokens_details"] == {"reasoning_tokens": BUDGET}
    result = http.post("/api/v1", json={"model": MODEL, "data": {**body, "response_format": openai_format}}).json()["result"]
    assert (result["response"], result["reasoning_content"]) == (answer, reasoning)
    with segmind_client(r1_server) as segmind:
        message = segmind.post("/v1/deepseek-reasoner", json={**body, "response_format": openai_format}).json()[
            "choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == (answer, reasoning)


def test_an_unsupported_schema_is_a_400_naming_it_in_every_dialect(r1_server, oai, http):
    schema = {"type": "object", "properties": {"age": {"type": "number", "minimum": 0}}}
    openai_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    named = "#/properties/age: the JSON schema keyword 'minimum' is not supported on type 'number'"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, response_format=openai_format)
    assert named in info.value.body["message"] and info.value.body["param"] == "response_format"
    r = http.post(f"/client/v4/accounts/acc/ai/run/{MODEL}", json={
        "messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": schema}})
    assert r.status_code == 400 and r.json()["success"] is False
    (error,) = r.json()["errors"]
    assert error["code"] == 5004 and "#/properties/age" in error["message"] and "'minimum'" in error["message"]
    r = http.post("/api/v1", json={"model": MODEL, "data": {"messages": MESSAGES, "response_format": openai_format}})
    assert r.status_code == 400 and r.json()["success"] is False and named in r.json()["errors"][0]
    with segmind_client(r1_server) as segmind:
        r = segmind.post("/v1/deepseek-reasoner", json={"messages": MESSAGES, "response_format": openai_format})
    assert r.status_code == 400 and named in r.json()["error"]


def test_earlier_reasoning_is_dropped_in_the_other_dialects_too(r1_server, http):
    def prompt_tokens(assistant: str) -> list[int]:
        messages = [*MESSAGES, {"role": "assistant", "content": assistant}, {"role": "user", "content": "And 3+3?"}]
        body = {"messages": messages, "max_tokens": 1}
        with segmind_client(r1_server) as segmind:
            segmind_usage = segmind.post("/v1/deepseek-reasoner", json=body).json()["usage"]
        return [http.post(f"/client/v4/accounts/acc/ai/run/{MODEL}", json=body).json()["result"]["usage"]["prompt_tokens"],
                http.post("/api/v1", json={"model": MODEL, "data": body}).json()["result"]["usage"]["prompt_tokens"],
                segmind_usage["prompt_tokens"]]

    plain = prompt_tokens("Four.")
    assert prompt_tokens("<think>\nLong thoughts here, many of them.\n</think>\n\nFour.") == plain
    assert prompt_tokens("Long thoughts here, many of them.\n</think>\n\nFour.") == plain  # R1 opened it itself


@pytest.fixture(scope="module")
def old_template_server(tiny_ggufs) -> RunningServer:
    """deepseek-r1-32b whose GGUF carries R1's template from before DeepSeek's revision: its prompt ends at
    `<｜Assistant｜>`, and deepserve opens the `<think>` block itself (reasoning.open_reasoning)."""
    running = start_server("--model-path", tiny_ggufs["deepseek-r1-distill-qwen-old-template"], "--model-id", MODEL,
                           "--parallel", "1", "--ctx-size", "256", "--threads", "1")
    yield running
    running.stop()


def test_an_older_r1_template_still_reasons_takes_budgets_and_grammars(old_template_server):
    oai = openai.OpenAI(base_url=old_template_server.base_url, api_key=old_template_server.api_key, max_retries=0)
    raw = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
                                      extra_body={"max_reasoning_tokens": BUDGET})  # the catalog's raw style
    content = raw.choices[0].message.content
    assert content.startswith("<think>\n") and content.count("</think>") == 1  # seed 004's shape
    assert raw.usage.completion_tokens_details.reasoning_tokens == BUDGET
    r = oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL_SCHEMA}},
        extra_body={"max_reasoning_tokens": BUDGET, "reasoning_format": "deepseek"})
    assert r.usage.completion_tokens_details.reasoning_tokens == BUDGET and message_extra(r, "reasoning_content")
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SMALL_SCHEMA)


def test_stop_strings_apply_to_the_answer_only(oai, reference):
    ref = reference["deepseek"]
    reasoning, answer = message_extra(ref, "reasoning_content"), ref.choices[0].message.content
    stop = reasoning[:3]  # text the model thinks before it answers
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, stop=[stop],
                                    extra_body={"max_reasoning_tokens": BUDGET, "reasoning_format": "deepseek"})
    assert message_extra(r, "reasoning_content") == reasoning  # the reasoning went on past the stop string
    assert r.choices[0].message.content == answer.split(stop)[0]
    assert r.choices[0].finish_reason == ("stop" if stop in answer else ref.choices[0].finish_reason)


def test_n_choices_stream_their_reasoning_apart(oai, reference):
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, n=2, stream=True,
        extra_body={"max_reasoning_tokens": BUDGET, "reasoning_format": "deepseek"}))
    reasoning, content = ["", ""], ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            reasoning[choice.index] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content[choice.index] += choice.delta.content or ""
    ref = reference["deepseek"]
    assert reasoning == [message_extra(ref, "reasoning_content")] * 2  # greedy: both choices think alike
    assert content == [ref.choices[0].message.content] * 2


def test_the_catalog_max_tokens_default_and_limit_hold_in_every_dialect(r1_server, oai, http):
    """deepseek-r1-32b (seed 004): 100 tokens when max_tokens is omitted, at most 32,768 when it is given."""
    forced = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                         extra_body={"ignore_eos": True, "max_reasoning_tokens": BUDGET})
    assert forced.usage.completion_tokens == 100 and forced.choices[0].finish_reason == "length"
    # greedy without ignore_eos: every dialect stops where OpenAI does (at 100 unless the model ended first)
    body = {"messages": MESSAGES, "temperature": 0, "max_reasoning_tokens": BUDGET}
    reference = http.post("/v1/chat/completions", json={**body, "model": MODEL}).json()["usage"]["completion_tokens"]
    assert reference <= 100
    with segmind_client(r1_server) as segmind:
        assert segmind.post("/v1/deepseek-reasoner", json=body).json()["usage"]["completion_tokens"] == reference
        too_many = segmind.post("/v1/deepseek-reasoner", json={**body, "max_tokens": 40000})
        assert too_many.status_code == 400 and "at most 32768" in too_many.json()["error"]
    run = f"/client/v4/accounts/acc/ai/run/{MODEL}"
    assert http.post(run, json=body).json()["result"]["usage"]["completion_tokens"] == reference  # not Cloudflare's 256
    assert http.post("/api/v1", json={"model": MODEL, "data": body}).json()["result"]["usage"]["completion_tokens"] == reference
    r = http.post(run, json={**body, "max_tokens": 40000})
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5004 and "at most 32768" in r.json()["errors"][0]["message"]
    r = http.post("/api/v1", json={"model": MODEL, "data": {**body, "max_tokens": 40000}})
    assert r.status_code == 400 and "at most 32768" in r.json()["errors"][0]
    with pytest.raises(openai.BadRequestError, match="at most 32768"):
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40000)


def test_a_model_that_stops_while_thinking_still_answers_the_schema(r1_server, oai, tiny_ggufs):
    """End-of-generation inside the reasoning (forced here with logit_bias +100 on EOS from the first token)
    would leave the answer empty and the response_format unmet: the engine closes the block instead, and the
    grammar, which never allows EOS before the JSON is complete, shapes the answer."""
    import gguf

    eos = int(gguf.GGUFReader(tiny_ggufs["deepseek-r1-distill-qwen"]).fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    openai_format = {"type": "json_schema", "json_schema": {"name": "small", "strict": True, "schema": SMALL_SCHEMA}}
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=80,
                                    response_format=openai_format, logit_bias={str(eos): 100},
                                    extra_body={"reasoning_format": "deepseek"})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    jsonschema.validate(json.loads(choice.message.content), SMALL_SCHEMA)
    # without a response_format, the same bias simply ends the turn at once, with nothing to show
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=80,
                                    logit_bias={str(eos): 100}, extra_body={"reasoning_format": "deepseek"})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1 and not r.choices[0].message.content
