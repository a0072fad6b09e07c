"""/tokenize and /detokenize with vLLM's and llama-server's requests, against what generation counts."""

from __future__ import annotations

import httpx
import openai

MESSAGES = [{"role": "user", "content": "Count to three."}]


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


def test_bad_input_and_bad_keys_are_refused(http, server):
    assert http.post("/detokenize", json={"tokens": [10**7]}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"model": "no-such-model", "prompt": "x"}).status_code == 404
    assert http.post("/tokenize", json={"prompt": "x", "content": "y"}).status_code == 400
    assert httpx.post(server.root_url + "/tokenize", json={"prompt": "x"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
