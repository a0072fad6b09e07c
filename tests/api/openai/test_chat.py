"""Chat completions through the real engine and real HTTP, with the official openai SDK."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.conftest import engine_stats
from tests.observability.conftest import scrape

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_non_streaming_chat_returns_text_and_usage(client: openai.OpenAI, server):
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == server.model
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_matches_non_streaming_greedy_text(client: openai.OpenAI, server):
    args = dict(model=server.model, messages=MESSAGES, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI, server):
    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4, stream=True))
    assert all(c.choices for c in chunks)
    assert all(getattr(c, "usage", None) is None for c in chunks)


def test_max_tokens_gives_finish_reason_length(client: openai.OpenAI, server):
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_max_completion_tokens_is_honoured(client: openai.OpenAI, server):
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_completion_tokens=2, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_n_two_returns_two_indexed_choices(client: openai.OpenAI, server):
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=8, n=2, seed=7, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 16


def test_n_two_streaming_delivers_both_choices(client: openai.OpenAI, server):
    chunks = list(
        client.chat.completions.create(
            model=server.model, messages=MESSAGES, max_tokens=6, n=2, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 12


def test_same_seed_same_prompt_gives_same_output(client: openai.OpenAI, server):
    args = dict(model=server.model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24,
                temperature=1.0, seed=1234)
    first = client.chat.completions.create(**args).choices[0].message.content
    second = client.chat.completions.create(**args).choices[0].message.content
    assert first == second


def test_different_seeds_give_different_outputs(client: openai.OpenAI, server):
    args = dict(model=server.model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24,
                temperature=1.0, extra_body={"ignore_eos": True})
    outputs = {client.chat.completions.create(**args, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert len(outputs) > 1


def test_stop_string_cuts_output_and_reports_it(client: openai.OpenAI, server):
    args = dict(model=server.model, messages=MESSAGES, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**args).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    r = client.chat.completions.create(**args, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].model_extra["stop_reason"] == stop


def test_stop_string_split_across_tokens_is_never_emitted(client: openai.OpenAI, server):
    args = dict(model=server.model, messages=MESSAGES, max_tokens=30, temperature=0,
                logprobs=True, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**args)
    full = r.choices[0].message.content
    tokens = [t.token for t in r.choices[0].logprobs.content]
    # a stop string made of the end of one token and the start of the next
    for i in range(1, len(tokens) - 1):
        left, right = tokens[i], tokens[i + 1]
        if len(left.strip()) >= 2 and len(right.strip()) >= 2:
            stop = left[-2:] + right[:2]
            break
    else:
        pytest.fail(f"no two neighbouring tokens long enough in {tokens}")
    assert full.find(stop) >= 0
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(**{**args, "logprobs": False}, stop=stop, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.chat.completions.create(**{**args, "logprobs": False}, stop=stop).choices[0].message.content
        assert text == full[: full.index(stop)]
        assert stop[:1] not in text[len(full[: full.index(stop)]):]


def test_logprobs_are_returned_per_token(client: openai.OpenAI, server):
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_prompt_cache_is_reported_as_cached_tokens(client: openai.OpenAI, server):
    messages = [{"role": "system", "content": "You answer in one word. " * 20}, {"role": "user", "content": "Hi"}]
    client.chat.completions.create(model=server.model, messages=messages, max_tokens=2)
    r = client.chat.completions.create(
        model=server.model, messages=messages[:1] + [{"role": "user", "content": "Hello there"}], max_tokens=2
    )
    assert r.usage.prompt_tokens_details.cached_tokens > 100
    assert r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    assert r.usage.model_extra["prompt_cache_hit_tokens"] == r.usage.prompt_tokens_details.cached_tokens


def test_content_parts_are_accepted(client: openai.OpenAI, server):
    r = client.chat.completions.create(
        model=server.model, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}],
    )
    plain = client.chat.completions.create(model=server.model, max_tokens=4, temperature=0, messages=MESSAGES)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens


def test_text_parts_are_one_line_each_as_vllm_and_llama_server_join_them(client: openai.OpenAI, server):
    parts = client.chat.completions.create(
        model=server.model, max_tokens=1,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]}],
    )
    lines = client.chat.completions.create(model=server.model, max_tokens=1,
                                           messages=[{"role": "user", "content": "Say\nhello"}])
    assert parts.usage.prompt_tokens == lines.usage.prompt_tokens


def test_a_user_message_without_content_is_400(client: openai.OpenAI, server):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=server.model, max_tokens=1, messages=[{"role": "user"}])
    assert refused.value.body["param"] == "messages" and "content" in refused.value.body["message"]


def test_an_output_cut_inside_a_character_drops_its_bytes_instead_of_sending_a_replacement(client, server):
    messages = [{"role": "user", "content": "Repeat exactly: 😀🎉 日本語"}]
    texts = [client.chat.completions.create(model=server.model, messages=messages, max_tokens=n, temperature=0)
             .choices[0].message.content for n in range(4, 14)]
    assert not [t for t in texts if "\ufffd" in t]
    assert any("😀" in t for t in texts)  # the cuts fell around multi-byte characters
    assert texts == sorted(texts, key=len) and all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_models_list_and_get(client: openai.OpenAI, server):
    ids = [m.id for m in client.models.list()]
    assert ids == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health_endpoints(http):
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/v1/health").json()["status"] == "ok"  # llama-server's second path
    assert http.get("/v1/health/live").status_code == 200
    ready = http.get("/v1/health/ready")
    assert ready.status_code == 200 and ready.json()["object"] == "health.response"
    assert engine_stats(http)["num_decode_errors"] == 0
    for path in ("/health", "/v1/health/live", "/v1/health/ready"):  # uptime checkers send HEAD
        head = http.head(path)
        assert head.status_code == 200 and head.content == b""


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    """The bundled model's token ids by token text (GPT-2 style BPE: "Ġ" is a leading space)."""
    import gguf

    from deepserve.bundled import bundled_model_path

    field = gguf.GGUFReader(str(bundled_model_path())).fields["tokenizer.ggml.tokens"]
    return {bytes(field.parts[i]).decode("utf-8"): n for n, i in enumerate(field.data)}


def test_logit_bias_minus_100_bans_a_token(client: openai.OpenAI, server, vocab):
    kwargs = dict(model=server.model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in client.completions.create(**kwargs).choices[0].text
    banned = client.completions.create(**kwargs, logit_bias={str(vocab["ĠParis"]): -100}).choices[0].text
    assert "Paris" not in banned and banned


def test_logit_bias_plus_100_forces_a_token(client: openai.OpenAI, server, vocab):
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=4, temperature=0.8, seed=1,
        logit_bias={str(vocab["Ġblue"]): 100}, extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.content == " blue" * 4


@pytest.mark.parametrize(("bias", "needle"), [({"49152": 5}, "vocabulary"), ({"12": 101}, "between -100 and 100"),
                                              ({"hello": 1}, "token ids")])
def test_bad_logit_bias_is_400_naming_the_field(http, server, bias, needle):
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": MESSAGES, "logit_bias": bias})
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "logit_bias"


def test_seed_minus_one_is_a_random_seed_as_in_vllm_and_llama_server(client, server):
    def text(seed: int) -> str:
        return client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=32, temperature=1.5, seed=seed).choices[0].message.content

    assert text(5) == text(5)
    assert len({text(-1) for _ in range(3)}) > 1  # 32 tokens at temperature 1.5: a repeat is all but impossible


def test_a_chats_known_pieces_are_not_tokenized_again(client, server, http):
    """The system prompt and the template's markers of a second chat come from the tokenizer cache (/health)."""
    system = {"role": "system", "content": f"You answer in one word. Conversation {uuid.uuid4().hex}."}

    def ask(question: str) -> int:
        r = client.chat.completions.create(model=server.model, max_tokens=1, temperature=0,
                                           messages=[system, {"role": "user", "content": question}])
        return r.usage.prompt_tokens

    first = ask(f"Which colour is the sky? {uuid.uuid4().hex}")
    before = engine_stats(http)["tokenizer_cache"]
    second = ask(f"Which colour is grass? {uuid.uuid4().hex}")
    after = engine_stats(http)["tokenizer_cache"]
    assert before["enabled"] and after["enabled"]
    assert after["num_misses"] - before["num_misses"] == 1  # only the new question was tokenized
    assert after["num_hits"] - before["num_hits"] == 4  # system prompt, two ends of turn, the assistant's opening
    assert 0 < after["bytes"] <= after["limit_bytes"] and after["pieces"] >= 5
    assert first > 0 and second > 0
    page = scrape(server.root_url)
    assert page.value("deepserve_tokenizer_cache_hits_total", model=server.model) == after["num_hits"]
    assert page.value("deepserve_tokenizer_cache_misses_total", model=server.model) == after["num_misses"]
    assert page.value("deepserve_tokenizer_cache_bytes", model=server.model) == after["bytes"]


def test_a_lone_request_starts_without_waiting_for_a_burst(client: openai.OpenAI, server, http):
    """The server counts requests on their way to the engine (CountArrivals): with none other, the engine's
    first step after idle does not wait for more."""
    before = engine_stats(http)["num_burst_waits"]
    r = client.chat.completions.create(model=server.model, max_tokens=2, temperature=0,
                                       messages=[{"role": "user", "content": "Say hi."}])
    assert r.usage.completion_tokens == 2
    assert engine_stats(http)["num_burst_waits"] == before
