"""DeepSeek's own API semantics: its base URLs (no /v1, and /beta) and chat prefix completion, with the openai SDK
as DeepSeek's documentation uses it; vLLM's continue_final_message and add_generation_prompt alike."""

from __future__ import annotations

import httpx
import openai
import pytest

QUESTION = {"role": "user", "content": "Write a Python function that adds two numbers."}
PREFIX = "```python\ndef add("


def sdk(server, path: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.root_url + path, api_key=server.api_key, max_retries=0)


@pytest.mark.parametrize("path", ["", "/beta"])
def test_deepseek_base_urls_serve_the_openai_routes(server, path):
    client = sdk(server, path)
    assert [m.id for m in client.models.list()] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    chat = client.chat.completions.create(model=server.model, messages=[QUESTION], max_tokens=4, temperature=0)
    same = sdk(server, "/v1").chat.completions.create(model=server.model, messages=[QUESTION], max_tokens=4,
                                                      temperature=0)
    assert chat.choices[0].message.content == same.choices[0].message.content
    assert chat.usage.prompt_tokens == same.usage.prompt_tokens
    text = client.completions.create(model=server.model, prompt="1, 2, 3,", max_tokens=3, temperature=0)
    assert text.usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[QUESTION])
    assert missing.value.body["code"] == "model_not_found"  # OpenAI's error body, not FastAPI's {"detail"}


def test_alias_paths_need_the_key(server):
    refused = httpx.post(server.root_url + "/chat/completions", headers={"Authorization": "Bearer wrong"},
                         json={"model": server.model, "messages": [QUESTION]})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    malformed = httpx.post(server.root_url + "/beta/completions", content=b"{not json",
                           headers={"Authorization": f"Bearer {server.api_key}"})
    assert malformed.status_code == 400 and "error" in malformed.json()


def _prompt(http, server, messages, **fields) -> list[int]:
    return http.post("/tokenize", json={"model": server.model, "messages": messages, **fields}).json()["tokens"]


def _text(http, server, tokens: list[int]) -> str:
    return http.post("/detokenize", json={"model": server.model, "tokens": tokens}).json()["prompt"]


def test_prefix_completion_continues_the_assistant_message(server, http):
    """DeepSeek's example: the assistant's answer starts with the prefix and the model writes what follows."""
    prefixed = [QUESTION, {"role": "assistant", "content": PREFIX, "prefix": True}]
    opened = _prompt(http, server, [QUESTION])  # ends with the assistant's turn opened
    continued = _prompt(http, server, prefixed, continue_final_message=True)
    assert continued[:len(opened)] == opened and _text(http, server, continued[len(opened):]) == PREFIX
    closed = _prompt(http, server, [QUESTION], add_generation_prompt=False)
    assert opened[:len(closed)] == closed and _text(http, server, opened[len(closed):]) == "<|im_start|>assistant\n"

    client = sdk(server, "/beta")
    chat = client.chat.completions.create(model=server.model, messages=prefixed, max_tokens=12, temperature=0)
    # The same text as a raw completion of the prompt up to the prefix: the model continued the message.
    raw = client.completions.create(model=server.model, prompt=continued, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == raw.choices[0].text
    assert not chat.choices[0].message.content.startswith(PREFIX)  # only the continuation comes back
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens == len(continued)

    streamed = client.chat.completions.create(model=server.model, messages=prefixed, max_tokens=12, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == raw.choices[0].text

    vllm = sdk(server, "/v1").chat.completions.create(
        model=server.model, messages=prefixed[:1] + [{"role": "assistant", "content": PREFIX}], max_tokens=12,
        temperature=0, extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert vllm.choices[0].message.content == raw.choices[0].text


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": "Hi", "prefix": True}]}, "assistant"),
    ({"messages": [QUESTION], "continue_final_message": True}, "assistant"),
    ({"messages": [QUESTION, {"role": "assistant", "content": "x"}], "continue_final_message": True,
      "add_generation_prompt": True}, "cannot both be true"),
    ({"messages": [QUESTION, {"role": "assistant", "content": "x", "prefix": "yes"}]}, "true or false"),
])
def test_a_message_that_cannot_be_continued_is_a_400(http, server, body, message):
    answer = http.post("/beta/chat/completions", json={"model": server.model, "max_tokens": 2, **body})
    assert answer.status_code == 400
    assert message in answer.json()["error"]["message"]
