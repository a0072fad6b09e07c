"""Legacy completions through the real engine, with the openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest


def test_completion_of_a_string_prompt(client: openai.OpenAI, server):
    r = client.completions.create(model=server.model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6


def test_completion_default_max_tokens_is_16(client: openai.OpenAI, server):
    r = client.completions.create(model=server.model, prompt="Once upon a time", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_list_of_prompts_gives_a_choice_per_prompt_and_n(client: openai.OpenAI, server):
    r = client.completions.create(
        model=server.model, prompt=["One, two,", "Red, green,"], max_tokens=4, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    single = client.completions.create(model=server.model, prompt="One, two,", max_tokens=1)
    other = client.completions.create(model=server.model, prompt="Red, green,", max_tokens=1)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens + other.usage.prompt_tokens


def test_streaming_completion_matches_non_streaming(client: openai.OpenAI, server):
    args = dict(model=server.model, prompt="def fibonacci(n):", max_tokens=12, temperature=0)
    full = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens > 0


def test_completion_logprobs_and_echo(client: openai.OpenAI, server):
    r = client.completions.create(
        model=server.model, prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=2, echo=True,
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    assert choice.text.startswith("1, 2, 3,")
    num_prompt = r.usage.prompt_tokens  # echo: the prompt's tokens lead the logprobs, then the 3 generated
    assert len(choice.logprobs.tokens) == num_prompt + 3 and len(choice.logprobs.top_logprobs[-1]) == 2
    assert choice.logprobs.text_offset[num_prompt] == len("1, 2, 3,")


def test_token_id_prompt_is_accepted(client: openai.OpenAI, server):
    r = client.completions.create(model=server.model, prompt=[504, 3458, 282], max_tokens=2)
    assert r.usage.prompt_tokens == 3


def test_token_ids_outside_the_vocabulary_are_400_and_leave_running_requests_alone(client: openai.OpenAI, server):
    stream = client.completions.create(model=server.model, prompt="Count: 1, 2, 3,", max_tokens=12, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))  # a request decoding in the engine's batch
    for prompt in ([33, 10**6], [-1], [[504], [33, 49152]]):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=server.model, prompt=prompt, max_tokens=2)
        assert refused.value.body["param"] == "prompt" and "vocabulary" in refused.value.body["message"]
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len([first, *rest]) == 12


def test_streamed_text_offsets_are_each_choices_own_and_count_the_echoed_prompt(client: openai.OpenAI, server):
    args = dict(model=server.model, prompt="Once upon", max_tokens=4, n=2, seed=3, logprobs=1, temperature=1.0,
                extra_body={"ignore_eos": True})
    for echo in (False, True):
        full = client.completions.create(**args, echo=echo)
        streamed = {0: [], 1: []}
        for chunk in client.completions.create(**args, echo=echo, stream=True):
            for choice in chunk.choices:
                if choice.logprobs:
                    streamed[choice.index] += choice.logprobs.text_offset
        for choice in full.choices:
            assert streamed[choice.index] == choice.logprobs.text_offset
            text = choice.text
            starts = [text.index(token, at) for token, at in zip(choice.logprobs.tokens, choice.logprobs.text_offset)]
            assert starts == choice.logprobs.text_offset  # each offset is where its token sits in the text


def test_streamed_text_offsets_with_a_stop_string_are_the_whole_answers(client: openai.OpenAI, server):
    """Text held back while a stop string may match reaches the client after its tokens' logprobs: the offsets
    still follow the tokens, as the whole answer's."""
    args = dict(model=server.model, prompt="1, 2, 3, 4,", max_tokens=30, stop=[" 7"], logprobs=1, temperature=0)
    full = client.completions.create(**args).choices[0].logprobs.text_offset
    streamed = [o for chunk in client.completions.create(**args, stream=True) for choice in chunk.choices
                if choice.logprobs for o in choice.logprobs.text_offset]
    assert streamed == full and full == sorted(full) and len(set(full)) == len(full)


def test_echo_with_logprobs_scores_the_prompt_tokens_as_lm_eval_reads_them(client: openai.OpenAI, server):
    """lm-evaluation-harness scores a continuation with echo=True, max_tokens=1, logprobs=1 and reads the prompt
    tokens' token_logprobs: the prompt leads, its first token with null, then the output (OpenAI, vLLM)."""
    prompt = "The capital of France is Paris"
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=1, logprobs=1, echo=True,
                                  temperature=0)
    lp, num_prompt = r.choices[0].logprobs, r.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == num_prompt + 1
    assert "".join(lp.tokens[:num_prompt]) == prompt and r.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(num_prompt + 1)]
    # the prompt's last token scored as the output would be: the same logprob as in a completion of the rest
    rest = client.completions.create(model=server.model, prompt=prompt.removesuffix(lp.tokens[num_prompt - 1]),
                                     max_tokens=1, logprobs=5, temperature=0)
    alternatives = rest.choices[0].logprobs.top_logprobs[0]
    assert lp.tokens[num_prompt - 1] in alternatives
    assert abs(alternatives[lp.tokens[num_prompt - 1]] - lp.token_logprobs[num_prompt - 1]) < 1e-3
    # streamed: the same logprobs, and a cached prompt changes nothing (scoring recomputes it)
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(model=server.model, prompt=prompt, max_tokens=1, logprobs=1, echo=True,
                                           temperature=0, stream=True):
        for choice in chunk.choices:
            if choice.logprobs:
                for key in streamed:
                    streamed[key] += getattr(choice.logprobs, key)
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"][0] is None
    assert all(abs(a - b) < 1e-4 for a, b in zip(streamed["token_logprobs"][1:], lp.token_logprobs[1:]))


def test_echo_of_a_token_id_prompt_is_its_text(client: openai.OpenAI, server):
    from deepserve.bundled import bundled_model_path
    from deepserve.engine.llamacpp.runner import LlamaRunner
    tokenizer = LlamaRunner(str(bundled_model_path()), ctx_size_per_seq=64, num_seqs=1, batch_size=64, num_threads=1)
    try:
        ids = tokenizer.tokenize("One, two,", add_special=False, parse_special=False)
    finally:
        tokenizer.close()
    r = client.completions.create(model=server.model, prompt=ids, max_tokens=2, echo=True, temperature=0)
    assert r.choices[0].text.startswith("One, two,") and len(r.choices[0].text) > len("One, two,")


def wait_idle(http) -> dict:
    """The engine's counters once nothing runs or waits (bounded polling of /health, no sleeps)."""
    for _ in range(2000):
        stats = http.get("/health").json()["engines"][0]
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
    return stats


def test_a_client_gone_aborts_every_prompt_of_a_multi_prompt_completion(http, server):
    """Every prompt's request is aborted, not only the one being read when the client left (the later ones
    once went on to max_tokens for nobody)."""
    body = {"model": server.model, "prompt": ["Hello", "World", "Again"], "max_tokens": 1000, "ignore_eos": True}
    before = wait_idle(http)
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the first token of the first prompt: hang up
    after_stream = wait_idle(http)
    assert after_stream["num_generated_tokens"] - before["num_generated_tokens"] < 3 * 200
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=2.0))
    after_timeout = wait_idle(http)
    assert after_timeout["num_running"] == 0
    assert after_timeout["num_generated_tokens"] - after_stream["num_generated_tokens"] < 3 * 200


def test_several_prompts_stream_interleaved_as_they_are_computed(client: openai.OpenAI, server):
    args = dict(model=server.model, prompt=["One, two,", "Red, green,"], max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})
    order = [c.choices[0].index for c in client.completions.create(**args, stream=True) if c.choices]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # choice 1 starts before choice 0 ends
    full = client.completions.create(**args)
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(**args, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [c.text for c in full.choices]


def test_llama_servers_repeat_penalty_is_repetition_penalty(client, server):
    def text(**extra) -> str:
        return client.completions.create(model=server.model, prompt="1, 1, 1, 1, 1, 1,", max_tokens=16,
                                         temperature=0, extra_body=extra).choices[0].text

    penalised = text(repetition_penalty=1.5)
    assert text(repeat_penalty=1.5) == penalised != text()
