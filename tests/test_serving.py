"""ServedModel's catalog defaults and ModelRegistry's answers, with a stand-in engine (no llama.cpp)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from deepserve.catalog import default_catalog
from deepserve.catalog.registry import LocalModel, LocalRegistry
from deepserve.errors import InvalidRequestError, ModelNotFoundError
from deepserve.serving import OFFLOAD_CHARS, ModelRegistry, ServedModel, messages_chars, prepare_off_loop
from deepserve.engine.types import Generation
from deepserve.templates.chat import CHATML_TEMPLATE, ChatTemplate, builtin_template


@dataclass
class _Engine:
    ctx_size: int = 1024

    def close(self) -> None:
        pass


def served(model_id: str, catalog_name: str | None = None, ctx_size: int = 1024) -> ServedModel:
    entry = default_catalog().get(catalog_name) if catalog_name else None
    return ServedModel(model_id=model_id, engine=_Engine(ctx_size), template=ChatTemplate(CHATML_TEMPLATE),
                       owned_by=entry.owned_by if entry else "deepserve", catalog=entry)


def test_catalog_default_max_tokens_applies_when_the_request_gives_none():
    r1 = served("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "deepseek-r1-32b")
    assert r1.resolve_max_tokens(None, 10) == 100
    assert r1.resolve_max_tokens(None, 1000) == 24  # never past the end of the window
    assert r1.resolve_max_tokens(500, 10) == 500
    with pytest.raises(InvalidRequestError, match="at most 32768") as info:
        r1.resolve_max_tokens(40000, 10)
    assert info.value.param == "max_tokens"


def test_without_a_catalog_default_max_tokens_fills_the_window():
    assert served("plain").resolve_max_tokens(None, 24) == 1000
    assert served("math", "@cf/deepseek-ai/deepseek-math-7b-base").resolve_max_tokens(None, 24) == 256


def test_card_facts_carry_window_prices_and_defaults():
    facts = served("deepseek-ai/deepseek-math-7b-instruct", "deepseek-math-7b-instruct").card_facts()
    assert facts["context_window"] == 4096 and facts["family"] == "deepseek-math"
    assert facts["pricing"] == {"unit": "nanodollars_per_million_tokens", "input": 100_000_000,
                                "cached_input": 100_000_000, "output": 110_000_000}
    r1 = served("r1", "deepseek-r1-32b").card_facts()
    assert r1["defaults"] == {"max_tokens": 100, "temperature": 0.6, "top_p": 0.95}
    assert r1["max_tokens_limit"] == 32768 and r1["reasoning"] is True and "pricing" not in r1
    assert served("plain").card_facts() == {}


def test_registry_finds_served_models_by_alias():
    registry = ModelRegistry(default_catalog())
    model = served("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "deepseek-r1-32b")
    registry.add(model)
    assert registry.get("deepseek-r1-32b") is model
    assert registry.get("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B") is model
    assert list(registry) == [model]


def test_registry_explains_why_a_catalog_model_is_not_served(tmp_path):
    local = LocalRegistry(tmp_path)
    gguf = tmp_path / "w.gguf"
    gguf.write_bytes(b"GGUF")
    local.add(LocalModel(id="deepseek-ai/deepseek-llm-7b-chat", path=str(gguf), source="pull"))
    registry = ModelRegistry(default_catalog(), local)
    registry.add(served("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"))

    def message(name: str) -> str:
        with pytest.raises(ModelNotFoundError) as info:
            registry.get(name)
        assert info.value.status_code == 404 and info.value.param == "model"
        return info.value.message

    assert "`deepserve models pull deepseek-ai/deepseek-coder-6.7b-instruct`" in message("deepseek-coder-6.7b-instruct")
    assert "`deepserve serve --model deepseek-ai/deepseek-llm-7b-chat`" in message("deepseek-llm-7b-chat")
    assert "upstream engine" in message("deepseek-reasoner")
    assert message("gpt-4") == "The model `gpt-4` does not exist. Available models: SmolLM2-135M-Instruct."


def _r1(model_id: str = "r1") -> ServedModel:
    entry = default_catalog().get("deepseek-r1-distill-qwen-32b")
    return ServedModel(model_id=model_id, engine=_Engine(), template=ChatTemplate(builtin_template("deepseek-r1")),
                       catalog=entry)


def test_how_a_chat_prompt_ends():
    """A new turn opened (R1's <think> too), the last assistant message continued (DeepSeek's prefix), or none."""
    model, question = _r1(), {"role": "user", "content": "Hi"}
    assert model.chat_prompt_text([question], Generation.OPEN).endswith("<｜User｜>Hi<｜Assistant｜><think>\n")
    assert model.chat_prompt_text([question], Generation.NONE).endswith("<｜User｜>Hi")
    for prefix in ("Hello", "<think>\nThe user greets"):  # the answer, or the reasoning, is continued as given
        continued = model.chat_prompt_text([question, {"role": "assistant", "content": prefix}], Generation.CONTINUE)
        assert continued.endswith("<｜User｜>Hi<｜Assistant｜>" + prefix)
    empty = model.chat_prompt_text([question, {"role": "assistant", "content": ""}], Generation.CONTINUE)
    assert empty == model.chat_prompt_text([question], Generation.OPEN)  # nothing to continue: a new turn
    trimming = ServedModel(model_id="t", engine=_Engine(), template=ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}"))
    trimmed = trimming.chat_prompt_text([question, {"role": "assistant", "content": "Hello \n"}], Generation.CONTINUE)
    assert trimmed == "<user>Hi</user><assistant>Hello \n"  # the text as given, without the end of turn
    dropping = ServedModel(model_id="t", engine=_Engine(), template=ChatTemplate(
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"))
    with pytest.raises(InvalidRequestError, match="cannot be continued"):
        dropping.chat_prompt_text([question, {"role": "assistant", "content": "Hello"}], Generation.CONTINUE)


def test_a_reasoning_models_prefix_continues_its_reasoning_or_its_answer():
    """DeepSeek's prefix completion with reasoning_content: the thought goes on (no answer yet), or the answer
    follows the closed thought."""
    model, question = _r1(), {"role": "user", "content": "Hi"}
    thinking = {"role": "assistant", "content": "", "reasoning_content": "The user greets me."}
    assert model.chat_prompt_text([question, thinking], Generation.CONTINUE).endswith(
        "<｜User｜>Hi<｜Assistant｜><think>\nThe user greets me.")
    answering = {**thinking, "content": "Hello"}
    assert model.chat_prompt_text([question, answering], Generation.CONTINUE).endswith(
        "<｜Assistant｜><think>\nThe user greets me.\n</think>\n\nHello")
    plain = served("m")  # a model that does not reason: only the answer text is continued
    assert plain.chat_prompt_text([question, answering], Generation.CONTINUE).endswith("assistant\nHello")


@dataclass
class _Upstream(_Engine):
    takes_text_prompts: bool = True

    def chat_prompt(self, messages, **fields):
        return messages, fields


def test_an_upstream_gets_the_message_to_continue_as_it_was_given():
    model = ServedModel(model_id="up", engine=_Upstream(), template=None)
    history = {"role": "assistant", "content": "<think>\nold\n</think>\n\nFour.", "reasoning_content": "old"}
    last = {"role": "assistant", "content": "<think>\nSo far \n", "reasoning_content": "thought", "prefix": True}
    messages, fields = model.chat_prompt_tokens([{"role": "user", "content": "Hi"}, history, last],
                                                generation=Generation.CONTINUE)
    assert messages[-1] == last and fields["generation"] is Generation.CONTINUE
    assert messages[1] == {"role": "assistant", "content": "Four."}  # earlier reasoning still goes


def test_a_short_request_is_prepared_inline_and_a_long_one_in_a_worker_thread():
    async def thread_preparing(num_chars: int) -> int:
        return await prepare_off_loop(num_chars, threading.get_ident)

    here = threading.get_ident()
    assert asyncio.run(thread_preparing(OFFLOAD_CHARS - 1)) == here
    assert asyncio.run(thread_preparing(OFFLOAD_CHARS)) != here

    def refuse(field: str) -> None:
        raise InvalidRequestError("refused", param=field)

    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(prepare_off_loop(OFFLOAD_CHARS, refuse, "messages"))
    assert info.value.param == "messages"


def test_messages_chars_counts_contents_and_tool_calls():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert messages_chars([{"role": "user", "content": "abc"}, {"role": "assistant", "content": None}]) == 3
    assert messages_chars([{"role": "assistant", "content": None, "tool_calls": calls}]) == len(str(calls))
    assert messages_chars([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) > 2
