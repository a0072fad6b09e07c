"""Each DeepSeek architecture through the real engine and real HTTP, on tiny random-weight GGUF files.

llama (deepseek-coder, deepseek-math), qwen2 (R1-Distill-Qwen) and deepseek2 (R1/V3: MLA + MoE) load, batch
several concurrent requests into shared decode steps, and answer chat and completion requests in the
OpenAI shape. The text is noise; shapes, token counts and finish reasons are not.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from deepserve.engine.llamacpp.runner import LlamaRunner
from deepserve.templates.chat import ChatTemplate, builtin_template
from tests.conftest import engine_stats
from tests.server import start_server

# family (tests/tiny_gguf.py) -> (model id served, template the server must use)
CASES = {
    "deepseek-coder": ("deepseek-ai/deepseek-coder-6.7b-instruct", "deepseek-coder"),
    "deepseek-math": ("deepseek-ai/deepseek-math-7b-instruct", "deepseek-llm"),  # GGUF has no template: catalog's
    "deepseek-r1-distill-qwen": ("deepseek-r1-32b", "deepseek-r1"),
    "deepseek-r1": ("tiny-deepseek-v3", "deepseek-r1"),  # R1's own id is upstream-only: served under another name
}
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is two plus two?"}]
MAX_TOKENS = 6
LONG_TOKENS = 160


def expected_prompt_tokens(gguf_path: str, template: str) -> int:
    runner = LlamaRunner(gguf_path, ctx_size_per_seq=64, num_seqs=1, batch_size=64, num_threads=1)
    try:
        text = ChatTemplate(builtin_template(template), bos_token=runner.token_text(runner.bos_token_id),
                            eos_token=runner.token_text(runner.eos_token_id)).render(MESSAGES)
        return len(runner.tokenize(text, add_special=False, parse_special=True))
    finally:
        runner.close()


def generated_text(chunk) -> str:
    """A chunk's text: content, or reasoning (R1's template opens <think>: its output starts as reasoning)."""
    if not chunk.choices:
        return ""
    delta = chunk.choices[0].delta
    return delta.content or (delta.model_extra or {}).get("reasoning_content") or ""


@pytest.mark.parametrize("family", list(CASES))
def test_architecture_serves_batched_chat_and_completions(family, tiny_ggufs):
    model_id, template = CASES[family]
    path = tiny_ggufs[family]
    num_prompt_tokens = expected_prompt_tokens(path, template)
    # One llama.cpp thread: its workers spin between steps, and on a 2-core runner a second one only starves
    # the HTTP side (a tiny model runs 5x faster this way).
    running = start_server("--model-path", path, "--model-id", model_id, "--parallel", "8", "--ctx-size", "256",
                           "--threads", "1")
    try:
        async def chat(client: openai.AsyncOpenAI):
            return await client.chat.completions.create(
                model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.8, seed=1,
                extra_body={"ignore_eos": True})

        async def complete(client: openai.AsyncOpenAI):
            return await client.completions.create(
                model=model_id, prompt="def add(a, b):", max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})

        async def main():
            client = openai.AsyncOpenAI(base_url=running.base_url, api_key=running.api_key, max_retries=0)
            # A long stream is decoding before the others arrive, so they must share its decode steps.
            long = await client.chat.completions.create(
                model=model_id, messages=MESSAGES, max_tokens=LONG_TOKENS, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [await anext(long)]
            while not generated_text(chunks[-1]):
                chunks.append(await anext(long))
            results = await asyncio.gather(*(chat(client) for _ in range(4)), *(complete(client) for _ in range(2)))
            chunks += [chunk async for chunk in long]
            return chunks, results

        long_chunks, (*chats, c1, c2) = asyncio.run(main())
        assert long_chunks[-1].usage.completion_tokens == LONG_TOKENS
        for r in chats:
            assert r.object == "chat.completion" and r.model == model_id
            assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
            assert r.choices[0].finish_reason == "length"
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (num_prompt_tokens, MAX_TOKENS)
        for r in (c1, c2):
            assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
            assert r.usage.completion_tokens == MAX_TOKENS and r.usage.prompt_tokens > 1

        client = openai.OpenAI(base_url=running.base_url, api_key=running.api_key, max_retries=0)
        chunks = list(client.chat.completions.create(
            model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS

        free = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=16)
        assert free.choices[0].finish_reason in ("stop", "length") and 1 <= free.usage.completion_tokens <= 16

        with httpx.Client(base_url=running.root_url, headers={"Authorization": f"Bearer {running.api_key}"}) as http:
            stats = engine_stats(http)
            card = http.get(f"/v1/models/{model_id}").json()
        assert stats["max_seqs_in_step"] >= 2 and stats["num_decode_errors"] == 0
        assert card["id"] == model_id
    finally:
        running.stop()
