"""The host-memory prompt cache (`--cache-ram`) through real HTTP and the openai SDK: with one slot, a
conversation that another user's request pushed out of the slot comes back with its whole prompt cached."""

from __future__ import annotations

import httpx
import openai

from tests.conftest import engine_stats
from tests.observability.conftest import scrape
from tests.server import start_server


def test_a_conversation_pushed_out_of_the_only_slot_comes_back_cached():
    running = start_server("--parallel", "1", "--cache-ram", "64")
    try:
        client = openai.OpenAI(base_url=running.base_url, api_key=running.api_key, max_retries=0)
        alice = [{"role": "user", "content": "Describe a lighthouse in a storm, in great detail. " * 4}]
        bob = [{"role": "user", "content": "List the planets of the solar system with one fact each. " * 4}]

        def ask(messages):
            return client.chat.completions.create(model=running.model, messages=messages, max_tokens=8,
                                                  temperature=0)

        first = ask(alice)
        ask(bob)  # takes the only slot; Alice's KV goes to RAM
        again = ask(alice)
        assert again.usage.prompt_tokens == first.usage.prompt_tokens
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        assert again.choices[0].message.content == first.choices[0].message.content

        with httpx.Client(base_url=running.root_url, headers={"Authorization": f"Bearer {running.api_key}"}) as http:
            cache = engine_stats(http)["prompt_cache"]
        assert cache["limit_bytes"] == 64 * 1024 * 1024
        assert cache["num_restored"] == 1 and cache["num_restored_tokens"] == again.usage.prompt_tokens - 1
        assert cache["entries"] == 2 and 0 < cache["bytes"] <= cache["limit_bytes"]
        page = scrape(running.root_url)
        model = running.model
        assert page.value("deepserve_prompt_cache_ram_restored_tokens_total", model=model) == cache["num_restored_tokens"]
        assert page.value("deepserve_prompt_cache_ram_bytes", model=model) == cache["bytes"]
        assert page.value("deepserve_prompt_cache_ram_entries", model=model) == 2
    finally:
        running.stop()
