"""llama-server's own `POST /completion` on the bundled model over real HTTP (httpx), against what the same
request gives through /v1/completions and /tokenize: llama-server's fields in, llama-server's answer out."""

from __future__ import annotations

import json

import httpx
import pytest

PROMPT = "The capital of France is"


def native(http: httpx.Client, body: dict, path: str = "/completion") -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_greedy_completion_is_the_same_text_as_v1_and_says_why_it_stopped(http, server):
    answer = native(http, {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "ignore_eos": True})
    v1 = http.post("/v1/completions", json={"model": server.model, "prompt": PROMPT, "max_tokens": 8,
                                            "temperature": 0, "ignore_eos": True}).json()
    assert answer["content"] == v1["choices"][0]["text"]
    assert (answer["stop"], answer["stop_type"], answer["stopping_word"]) == (True, "limit", "")
    assert answer["tokens_predicted"] == 8 and answer["tokens_evaluated"] == v1["usage"]["prompt_tokens"]
    assert answer["model"] == server.model and answer["prompt"].endswith(PROMPT)
    timings = answer["timings"]
    assert timings["predicted_n"] == 8 and timings["prompt_n"] + timings["cache_n"] == answer["tokens_evaluated"]
    assert timings["predicted_ms"] > 0 and timings["predicted_per_second"] > 0
    assert answer["generation_settings"]["n_predict"] == 8 and answer["tokens"] == []
    assert "completion_probabilities" not in answer


def test_a_stop_word_and_the_end_of_generation(http):
    free = native(http, {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "ignore_eos": True})
    word = free["content"].strip().split()[0]
    stopped = native(http, {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "stop": [word]})
    assert (stopped["stop_type"], stopped["stopping_word"]) == ("word", word)
    assert word not in stopped["content"]
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Say hi"}]}).json()["tokens"]
    ended = native(http, {"prompt": chat, "n_predict": 200, "temperature": 0})  # a prompt of token ids
    assert ended["stop_type"] == "eos" and ended["tokens_predicted"] < 200 and ended["tokens_evaluated"] == len(chat)


def test_special_tokens_in_the_prompt_are_read_as_llama_server_reads_them(http):
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    answer = native(http, {"prompt": chat, "n_predict": 1})
    special = http.post("/tokenize", json={"content": chat, "add_special": True}).json()["count"]
    as_text = http.post("/tokenize", json={"content": chat, "parse_special": False}).json()["count"]
    assert answer["tokens_evaluated"] == special < as_text


def test_the_stream_is_the_same_text_then_one_final_result_without_done(http):
    body = {"prompt": PROMPT, "n_predict": 10, "temperature": 0, "ignore_eos": True, "return_tokens": True}
    whole = native(http, body)
    with http.stream("POST", "/completion", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and "data: [DONE]" not in lines
    events = [json.loads(line[6:]) for line in lines]
    *tokens, final = events
    assert "".join(e["content"] for e in tokens) == whole["content"]
    assert [t for e in tokens for t in e["tokens"]] == whole["tokens"] and len(whole["tokens"]) == 10
    assert all(e["stop"] is False for e in tokens) and [e["tokens_predicted"] for e in tokens] == list(range(1, 11))
    assert {e["tokens_evaluated"] for e in events} == {whole["tokens_evaluated"]}
    assert (final["stop"], final["content"], final["stop_type"], final["tokens_predicted"]) == (True, "", "limit", 10)
    assert final["timings"]["predicted_n"] == 10


def test_n_probs_gives_completion_probabilities_with_ids(http):
    answer = native(http, {"prompt": PROMPT, "n_predict": 3, "temperature": 0, "n_probs": 4, "return_tokens": True})
    probs = answer["completion_probabilities"]
    assert [p["id"] for p in probs] == answer["tokens"]
    for p in probs:
        assert len(p["top_logprobs"]) == 4 and p["top_logprobs"][0]["id"] == p["id"]  # greedy: the likeliest
        assert bytes(p["bytes"]).decode() == p["token"] and p["logprob"] == p["top_logprobs"][0]["logprob"] <= 0
    assert "".join(p["token"] for p in probs) == answer["content"]


def test_logit_bias_keys_that_are_not_ids_are_text():
    from deepserve.api.llamacpp.schemas import NativeCompletionRequest

    seen: list[str] = []
    request = NativeCompletionRequest(logit_bias={"--5": 1, "²": 2, "7": False})
    bias = request._logit_bias(lambda text: seen.append(text) or [100 + len(seen)])
    assert seen == ["--5", "²"] and bias == {101: 1.0, 102: 2.0, 7: -100.0}


def test_logit_bias_false_bans_a_token_and_response_fields_pick_the_answer(http):
    first = native(http, {"prompt": PROMPT, "n_predict": 1, "temperature": 0, "return_tokens": True})
    banned = native(http, {"prompt": PROMPT, "n_predict": 1, "temperature": 0, "return_tokens": True,
                           "logit_bias": [[first["tokens"][0], False]]})
    assert banned["tokens"] != first["tokens"]
    picked = native(http, {"prompt": PROMPT, "n_predict": 2, "response_fields": ["content", "timings/predicted_n"]})
    assert set(picked) == {"content", "timings/predicted_n"} and picked["timings/predicted_n"] == 2


def test_json_schema_constrains_the_content(http):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    answer = native(http, {"prompt": "Name a city as JSON: ", "n_predict": 40, "temperature": 0,
                           "json_schema": schema})
    assert isinstance(json.loads(answer["content"])["city"], str)


@pytest.mark.parametrize("body, status, kind", [
    ({"prompt": PROMPT, "n_probs": 500}, 400, "invalid_request_error"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "invalid_request_error"),
    ({"prompt": "word " * 2000}, 400, "exceed_context_size_error"),
    ({"prompt": ""}, 400, "invalid_request_error"),
    ({"prompt": PROMPT, "json_schema": {"type": "object", "properties": [1]}}, 400, "invalid_request_error"),
    ({"prompt": PROMPT, "json_schema": {"type": "object", "properties": {"a": {}}, "required": 5}}, 400,
     "invalid_request_error"),
    ({"prompt": PROMPT, "grammar": "root ::= foo"}, 400, "invalid_request_error"),
    ({"prompt": PROMPT, "grammar": "root ::= root"}, 400, "invalid_request_error"),
    ({"prompt": [True, False]}, 400, "invalid_request_error"),
    ({"prompt": PROMPT, "json_schema": {"type": "object", "properties": None}}, 400, "invalid_request_error"),
    ({"prompt": PROMPT, "logit_bias": [[1, 10**400]]}, 400, "invalid_request_error"),
])
def test_bad_requests_get_llama_servers_error_shape(http, body, status, kind):
    r = http.post("/completion", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert (error["code"], error["type"]) == (status, kind) and error["message"]


def test_a_prompt_past_the_window_tells_its_size_and_the_window_as_llama_server(http):
    r = http.post("/completion", json={"prompt": "word " * 2000})
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "exceed_context_size_error"
    assert error["n_ctx"] == 1024 and error["n_prompt_tokens"] >= 2000
    assert f"your prompt is {error['n_prompt_tokens']} tokens" in error["message"]


def test_a_model_name_the_server_does_not_know_is_ignored_while_it_serves_one(http, server):
    """llama-server ignores `model`; editor plugins send whatever name their user configured."""
    body = {"prompt": PROMPT, "n_predict": 3, "temperature": 0}
    assert native(http, {**body, "model": "qwen2.5-coder"})["content"] == native(http, body)["content"]


def test_a_bad_key_and_a_model_without_fim_tokens(server, http):
    refused = httpx.post(server.root_url + "/completion", json={"prompt": PROMPT},
                         headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    r = http.post("/infill", json={"input_prefix": "def f():\n    return ", "input_suffix": "\n"})
    assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"  # as llama-server
    assert "Infill is not supported" in r.json()["error"]["message"]
    missing = http.post("/infill", json={"input_suffix": "\n"})
    assert missing.status_code == 400 and "input_prefix" in missing.json()["error"]["message"]


def test_n_predict_0_computes_the_prompt_only_for_the_next_request_to_reuse(http):
    """llama.vim and llama.vscode warm the cache this way: nothing generated, the prompt's KV kept."""
    prompt = "A prompt to warm up the cache with, long enough to be worth keeping: " * 4
    warm = native(http, {"prompt": prompt, "n_predict": 0})
    assert (warm["content"], warm["tokens_predicted"], warm["stop_type"]) == ("", 0, "limit")
    answer = native(http, {"prompt": prompt, "n_predict": 2})
    assert answer["timings"]["cache_n"] == answer["tokens_evaluated"] - 1  # all but the last prompt token reused


def test_n_predict_past_the_window_generates_to_its_end(http, server):
    """llama-server fills the window and says truncated, rather than refusing the request."""
    prompt = "count: " + "one two three " * 300
    size = http.post("/tokenize", json={"content": prompt, "add_special": True}).json()["count"]
    answer = native(http, {"prompt": prompt, "n_predict": 5000, "ignore_eos": True})
    assert answer["tokens_predicted"] == 1024 - size and answer["truncated"] is True and answer["stop_type"] == "limit"
    assert native(http, {"prompt": PROMPT, "n_predict": 3})["truncated"] is False
    # n_predict -1 (llama-server's default): generate until the window is full, and say so
    endless = native(http, {"prompt": prompt, "n_predict": -1, "ignore_eos": True})
    assert endless["tokens_predicted"] == 1024 - size and endless["truncated"] is True


def test_samplers_left_out_do_nothing(http):
    """llama.vim sends samplers ["top_k", "top_p", "infill"]: no temperature step (1.0), no min_p."""
    body = {"prompt": PROMPT, "n_predict": 12, "seed": 7, "temperature": 0.1, "min_p": 0.3, "ignore_eos": True}
    listed = native(http, {**body, "samplers": ["top_k", "top_p"]})["content"]
    plain = native(http, {**body, "temperature": 1.0, "min_p": 0.0})["content"]
    assert listed == plain != native(http, body)["content"]


def test_the_infill_sampler_runs_where_it_is_listed(http):
    """llama.cpp's infill sampler (llama.vim's samplers end with it) merges the probabilities of tokens that are
    prefixes of one another and may end the answer: with it, some seeds sample differently than without it."""
    body = {"prompt": "def fib(n):\n", "n_predict": 16, "samplers": ["top_k", "top_p"]}
    answers = {seed: native(http, {**body, "seed": seed}) for seed in range(1, 5)}
    infilled = {seed: native(http, {**body, "seed": seed, "samplers": ["top_k", "top_p", "infill"]})
                for seed in range(1, 5)}
    assert any(infilled[s]["content"] != answers[s]["content"] for s in answers)
    for seed, answer in answers.items():  # without it, the same seed gives the same answer again
        assert native(http, {**body, "seed": seed})["content"] == answer["content"]


def test_n_indent_ends_the_answer_at_a_line_indented_less(http):
    """llama.vim's n_indent: after the first line, the first line indented less than n_indent ends the answer, cut
    after its indentation; what comes before is the free answer's."""
    body = {"prompt": "```python\ndef fibonacci(n):\n", "n_predict": 80, "temperature": 0, "ignore_eos": True}
    free = native(http, body)
    native(http, {**body, "n_predict": 0})  # the prompt in the cache, as llama.vim warms it
    cut = native(http, {**body, "n_indent": 4})
    assert free["content"].startswith(cut["content"]) and cut["tokens_predicted"] < free["tokens_predicted"]
    *whole, last = cut["content"].split("\n")
    assert len(whole) >= 1 and last.strip() == ""  # the offending line: only its indentation is kept
    assert all(len(line) - len(line.lstrip()) >= 4 for line in whole[1:])
    assert cut["stop_type"] == "limit"
    # The engine ended it (not the route): its counts hold, the cached prompt is charged as cached.
    assert cut["timings"]["cache_n"] == cut["tokens_evaluated"] - 1
    with http.stream("POST", "/completion", json={**body, "n_indent": 4, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == cut["content"]  # what streams is what the answer holds


@pytest.mark.parametrize("raw", ['{"prompt": "a", "n_predict": 2, "temperature": Infinity}',
                                 '{"prompt": "a", "n_predict": 2, "logit_bias": {"5": NaN}}'])
def test_json_infinity_and_nan_are_refused(http, raw):
    r = http.post("/completion", content=raw.encode())
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_samplers_string_is_llama_cpps_letters(http):
    body = {"prompt": PROMPT, "n_predict": 12, "seed": 7, "temperature": 0.1, "min_p": 0.3, "ignore_eos": True}
    assert native(http, {**body, "samplers": "kp"})["content"] == native(
        http, {**body, "samplers": ["top_k", "top_p"]})["content"]


def test_several_prompts_get_an_array_of_results_streamed_interleaved_by_index(http):
    body = {"n_predict": 6, "temperature": 0, "ignore_eos": True}
    prompts = [PROMPT, "The capital of Italy is"]
    singles = [native(http, {**body, "prompt": p})["content"] for p in prompts]
    both = http.post("/completion", json={**body, "prompt": prompts}).json()
    assert [r["content"] for r in both] == singles and [r["index"] for r in both] == [0, 1]
    with http.stream("POST", "/completion", json={**body, "prompt": prompts, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    for index in (0, 1):
        mine = [e for e in events if e["index"] == index]
        assert "".join(e["content"] for e in mine) == singles[index]
        assert [e["stop"] for e in mine].count(True) == 1 and mine[-1]["stop"] is True
    assert http.post("/completion", json={**body, "prompt": [1, "mixed"]}).status_code == 400


def test_penalties_look_at_the_prompt_as_llama_servers_do(http, server):
    """repeat_last_n (64) tokens, the prompt's included: the very first token is already penalised for repeating
    the prompt; on /v1 (OpenAI's meaning) only generated tokens count, so the first token is the unpenalised one."""
    prompt = "1, 1, 1, 1, 1, 1, 1, 1,"
    plain = native(http, {"prompt": prompt, "n_predict": 1, "temperature": 0, "return_tokens": True})["tokens"]
    native_penalised = native(http, {"prompt": prompt, "n_predict": 1, "temperature": 0, "return_tokens": True,
                                     "repeat_penalty": 2.0})["tokens"]
    off = native(http, {"prompt": prompt, "n_predict": 1, "temperature": 0, "return_tokens": True,
                        "repeat_penalty": 2.0, "repeat_last_n": 0})["tokens"]
    v1 = http.post("/v1/completions", json={"model": server.model, "prompt": prompt, "max_tokens": 1,
                                            "temperature": 0, "repetition_penalty": 2.0, "logprobs": 0}).json()
    assert native_penalised != plain and off == plain
    assert v1["choices"][0]["text"] == native(http, {"prompt": prompt, "n_predict": 1, "temperature": 0})["content"]


def test_completions_without_a_model_is_llama_servers_alias_of_completion(http, server):
    """llama-server answers POST /completions as /completion; DeepSeek's /completions (OpenAI's legacy shape) names
    its model, and keeps its route."""
    body = {"prompt": PROMPT, "n_predict": 3, "temperature": 0}
    native_answer = native(http, body, path="/completions")
    assert native_answer["tokens_predicted"] == 3 and native_answer["content"] == native(http, body)["content"]
    openai = native(http, {"model": server.model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0},
                    path="/completions")
    assert openai["object"] == "text_completion" and openai["choices"][0]["text"] == native_answer["content"]
    streamed = http.post("/completions", json={**body, "stream": True})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == native_answer["content"] and events[-1]["stop"] is True
    bad = http.post("/completions", json={"prompt": PROMPT, "temperature": -1})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400  # llama-server's envelope

    def oversized():  # no Content-Length: the limit is found while the body is read
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    too_large = http.post("/completions", content=oversized(), headers={"Content-Type": "application/json"})
    assert too_large.status_code == 413, too_large.text
