"""/tokenize and /detokenize with vLLM's and llama-server's requests, against what generation counts."""

from __future__ import annotations

import httpx
import openai
import pytest

from deepserve.serving import OFFLOAD_CHARS

MESSAGES = [{"role": "user", "content": "Count to three."}]
# Long enough to be prepared in a worker thread; "=" * 64 is one token of this model, so it fits the test server's
# 1,024-token window.
LONG_PROMPT = "=" * OFFLOAD_CHARS + "\nWhat was above?"


def test_vllm_style_counts_match_what_a_request_is_charged(http, client: openai.OpenAI, server):
    counted = http.post("/tokenize", json={"model": server.model, "prompt": "Hello world, hello tokens"}).json()
    assert counted["count"] == len(counted["tokens"]) and counted["max_model_len"] == 1024
    completion = client.completions.create(model=server.model, prompt="Hello world, hello tokens", max_tokens=1)
    assert counted["count"] == completion.usage.prompt_tokens
    chat = http.post("/tokenize", json={"model": server.model, "messages": MESSAGES}).json()
    answered = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == answered.usage.prompt_tokens
    back = http.post("/detokenize", json={"model": server.model, "tokens": counted["tokens"]}).json()
    assert back["prompt"] == back["content"] == "Hello world, hello tokens"


def test_llama_server_style_needs_no_model_and_gives_pieces(http):
    plain = http.post("/tokenize", json={"content": "Hello world"}).json()
    pieces = http.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).json()
    assert [p["id"] for p in pieces["tokens"]] == plain["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"]) == "Hello world"
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json()["content"] == "Hello world"


def test_a_piece_that_is_part_of_a_character_comes_as_its_bytes(http):
    """llama-server's with_pieces: a token holding only part of a multi-byte character is a list of byte values
    (a string would have to replace it with U+FFFD), so the text can be rebuilt from the pieces."""
    text = "日本 🐱 ok"
    tokens = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert any(isinstance(t["piece"], list) for t in tokens)  # this vocabulary splits these characters
    rebuilt = b"".join(bytes(t["piece"]) if isinstance(t["piece"], list) else t["piece"].encode() for t in tokens)
    assert rebuilt.decode("utf-8") == text


def test_bad_input_and_bad_keys_are_refused(http, server):
    assert http.post("/detokenize", json={"tokens": [10**7]}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"model": "no-such-model", "prompt": "x"}).status_code == 404
    assert http.post("/tokenize", json={"prompt": "x", "content": "y"}).status_code == 400
    assert http.post("/tokenize", json={"messages": []}).json()["error"]["param"] == "messages"
    assert httpx.post(server.root_url + "/tokenize", json={"prompt": "x"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_special_tokens_are_read_and_written_as_llama_server_and_vllm_do(http, client: openai.OpenAI, server):
    """A raw prompt written in the model's own chat format is that chat: the same prompt tokens and the same greedy
    answer as the chat request; /detokenize writes special tokens as their text."""
    chat = http.post("/tokenize", json={"model": server.model, "messages": MESSAGES}).json()["tokens"]
    text = http.post("/detokenize", json={"model": server.model, "tokens": chat}).json()["prompt"]
    assert text.count("<|im_start|>") == 3 and text.endswith("<|im_start|>assistant\n")
    as_chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8, temperature=0)
    as_text = client.completions.create(model=server.model, prompt=text, max_tokens=8, temperature=0)
    assert as_text.usage.prompt_tokens == as_chat.usage.prompt_tokens == len(chat)
    assert as_text.choices[0].text == as_chat.choices[0].message.content
    literal = http.post("/tokenize", json={"content": "<|im_start|>", "parse_special": False}).json()
    assert literal["count"] > 1  # llama-server's parse_special false: the marker as plain text
    pieces = http.post("/tokenize", json={"content": "<|im_start|>user", "with_pieces": True}).json()["tokens"]
    assert pieces[0]["piece"] == "<|im_start|>"


def test_long_requests_prepared_off_the_event_loop_count_as_short_ones_do(http, client: openai.OpenAI, server):
    """A request of OFFLOAD_CHARS or more is templated and tokenized in a worker thread: the same tokens, the same
    errors."""
    prompt = LONG_PROMPT
    counted = http.post("/tokenize", json={"model": server.model, "prompt": prompt}).json()["count"]
    assert counted < 400
    assert client.completions.create(model=server.model, prompt=prompt, max_tokens=1).usage.prompt_tokens == counted
    messages = [{"role": "user", "content": prompt}]
    chat = http.post("/tokenize", json={"model": server.model, "messages": messages}).json()["count"]
    answered = client.chat.completions.create(model=server.model, messages=messages, max_tokens=1)
    assert answered.usage.prompt_tokens == chat > counted
    # An error found while preparing (a forced tool that is not offered) is still the caller's 400.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=1,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            tool_choice={"type": "function", "function": {"name": "g"}})
    assert info.value.body["param"] == "tool_choice"


def test_each_dialect_counts_a_long_prompt_as_tokenize_does(http, server):
    """llama-server's /completion, Workers AI and Dataoorts prepare a long prompt off the event loop too."""
    prompt = LONG_PROMPT
    raw = http.post("/tokenize", json={"model": server.model, "prompt": prompt}).json()["count"]
    native = http.post("/completion", json={"prompt": prompt, "n_predict": 1})
    assert native.status_code == 200 and native.json()["tokens_evaluated"] == raw
    messages = [{"role": "user", "content": prompt}]
    chat = http.post("/tokenize", json={"model": server.model, "messages": messages}).json()["count"]
    dataoorts = http.post("/api/v1", json={"model": server.model, "data": {"messages": messages, "max_tokens": 1}})
    assert dataoorts.status_code == 200 and dataoorts.json()["result"]["usage"]["prompt_tokens"] == chat
    # Workers AI caps each message at 4,096 characters (its schema): three turns make a long chat.
    third = "=" * (OFFLOAD_CHARS // 3 + 64)
    turns = [{"role": "user", "content": third}, {"role": "assistant", "content": third},
             {"role": "user", "content": third + "\nWhat was above?"}]
    counted = http.post("/tokenize", json={"model": server.model, "messages": turns}).json()["count"]
    workers = http.post(f"/client/v4/accounts/acc-1/ai/run/{server.model}", json={"messages": turns, "max_tokens": 1})
    assert workers.status_code == 200 and workers.json()["result"]["usage"]["prompt_tokens"] == counted
