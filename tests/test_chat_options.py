"""Every dialect turns its body into the same engine parameters: the model's default sampling (R1: temperature
0.6, top_p 0.95) where the request gives none, reasoning style and budget, response_format, tools; and the
prompt never carries earlier reasoning. A stand-in engine records what the template rendered."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from deepserve.api.dataoorts.schemas import DataoortsRequest
from deepserve.api.openai.schemas import ChatCompletionRequest
from deepserve.api.segmind.schemas import SegmindChatRequest
from deepserve.api.workers_ai.schemas import RunRequest
from deepserve.catalog import default_catalog
from deepserve.chat_options import ChatOptions, prepare_chat
from deepserve.engine.types import ReasoningFormat, SamplingParams
from deepserve.errors import InvalidRequestError
from deepserve.serving import ServedModel
from deepserve.templates.chat import ChatTemplate, builtin_template
from deepserve.tools import DEEPSEEK, HERMES

MESSAGES = [{"role": "user", "content": "2+2?"}]


@dataclass
class _Engine:
    ctx_size: int = 4096
    rendered: list[str] = field(default_factory=list)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        self.rendered.append(text)
        if parse_special and text.startswith("<") and text.endswith(">") and text.count(">") == 1:
            return [1]  # a special token
        return list(range(len(text)))


def served(catalog_name: str | None, template: str = "deepseek-r1") -> ServedModel:
    entry = default_catalog().get(catalog_name) if catalog_name else None
    return ServedModel(model_id=catalog_name or "plain", engine=_Engine(), template=ChatTemplate(builtin_template(template)),
                       catalog=entry)


def openai_sampling(model: ServedModel, **body) -> SamplingParams:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **body})
    chat = prepare_chat(model, request.template_messages(), request.chat_options())
    return chat.configure(model, request.to_sampling(64), omitted=request.omitted_sampling())


def test_r1_defaults_fill_what_every_dialect_omits():
    r1 = served("deepseek-r1-1.5b")
    samplings = {
        "openai": openai_sampling(r1),
        "segmind": openai_sampling(r1, **SegmindChatRequest.model_validate({"messages": MESSAGES}).to_openai("s")
                                   .model_dump(exclude={"model", "messages"}, exclude_none=True)),
        "workers_ai": RunRequest.model_validate({"prompt": "2+2?"}).to_sampling(r1),
        "dataoorts": DataoortsRequest.model_validate({"model": "m", "data": {"messages": MESSAGES}}).data.to_sampling(r1),
    }
    for dialect, sampling in samplings.items():
        assert (sampling.temperature, sampling.top_p) == (0.6, 0.95), dialect
        assert sampling.reasoning.enabled and sampling.reasoning.format == ReasoningFormat.DEEPSEEK, dialect
    # what the request gives wins
    assert (openai_sampling(r1, temperature=0.1, top_p=0.5).temperature, openai_sampling(r1, top_p=0.5).top_p) == (0.1, 0.5)
    assert RunRequest.model_validate({"prompt": "x", "temperature": 1.5}).to_sampling(r1).temperature == 1.5
    # a model without recommendations keeps each dialect's own defaults
    plain = served(None, "chatml")
    assert (openai_sampling(plain).temperature, openai_sampling(plain).top_p) == (1.0, 1.0)
    assert RunRequest.model_validate({"prompt": "x"}).to_sampling(plain).temperature == 0.6  # Workers AI's default
    assert not openai_sampling(plain).reasoning.enabled
    # the catalog's max_tokens default and limit hold in the dialects whose schema has a default of its own
    r1_32b = served("deepseek-r1-32b")
    assert RunRequest.model_validate({"prompt": "x"}).to_sampling(r1_32b, 10).max_tokens == 100  # not 256
    assert RunRequest.model_validate({"prompt": "x", "max_tokens": 300}).to_sampling(r1_32b, 10).max_tokens == 300
    assert DataoortsRequest.model_validate({"model": "m", "data": {"messages": MESSAGES}}).data.to_sampling(
        r1_32b, 10).max_tokens == 100
    with pytest.raises(InvalidRequestError, match="at most 32768"):
        RunRequest.model_validate({"prompt": "x", "max_tokens": 40000}).to_sampling(r1_32b, 10)
    assert RunRequest.model_validate({"prompt": "x"}).to_sampling(plain, 10).max_tokens == 256  # Cloudflare's


def test_reasoning_style_and_budget_per_request_and_per_model():
    r1_32b = served("deepseek-r1-32b")  # the catalog makes raw its default (seed 004 shows the block inline)
    assert openai_sampling(r1_32b).reasoning.format == ReasoningFormat.RAW
    assert openai_sampling(r1_32b, reasoning_format="deepseek").reasoning.format == ReasoningFormat.DEEPSEEK
    r1 = served("deepseek-r1-1.5b")
    assert openai_sampling(r1, reasoning_effort="low").reasoning.budget == 1024
    assert openai_sampling(r1, reasoning_effort="medium").reasoning.budget == 4096
    assert openai_sampling(r1, reasoning_effort="high", max_reasoning_tokens=9).reasoning.budget == 9
    assert openai_sampling(r1).reasoning.budget is None
    # OpenRouter's reasoning object
    extra = openai_sampling(r1, reasoning={"effort": "low", "exclude": True}).reasoning
    assert (extra.budget, extra.format) == (1024, ReasoningFormat.HIDDEN)
    hidden = RunRequest.model_validate({"prompt": "x", "reasoning_format": "hidden", "max_reasoning_tokens": 3})
    assert (hidden.to_sampling(r1).reasoning.format, hidden.to_sampling(r1).reasoning.budget) == (ReasoningFormat.HIDDEN, 3)
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "reasoning_format": "loud"})


def test_response_format_and_tools_become_grammars():
    r1 = served("deepseek-r1-1.5b")
    assert openai_sampling(r1, response_format={"type": "json_object"}).grammar is not None
    assert RunRequest.model_validate({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "type": "object", "properties": {"a": {"type": "boolean"}}}}}).to_sampling(r1).grammar is not None
    with pytest.raises(InvalidRequestError, match="'minimum' is not supported"):
        openai_sampling(r1, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "number", "minimum": 1}}})
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    auto = openai_sampling(r1, tools=[tool])
    assert auto.tool_format == DEEPSEEK and auto.grammar is None
    forced = openai_sampling(r1, tools=[tool], tool_choice="required")
    assert forced.grammar.root == "tool-calls" and "<｜tool▁calls▁begin｜> tool-call" in forced.grammar.gbnf
    assert openai_sampling(served(None, "chatml"), tools=[tool]).tool_format == HERMES
    none = openai_sampling(r1, tools=[tool], tool_choice="none")
    assert none.tool_format is None and none.grammar is None
    with pytest.raises(InvalidRequestError, match="cannot be combined"):
        openai_sampling(r1, tools=[tool], tool_choice="required", response_format={"type": "json_object"})


def test_earlier_reasoning_never_reaches_the_template():
    r1 = served("deepseek-r1-1.5b", "chatml")
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "<think>\nsecret thoughts\n</think>\n\nHello!",
                "reasoning_content": "secret thoughts"},
               {"role": "user", "content": "Again"}]
    prepare_chat(r1, history, ChatOptions())
    rendered = r1.engine.rendered[-1]
    assert "secret" not in rendered and "<|im_start|>assistant\nHello!<|im_end|>" in rendered


def test_an_older_r1_template_gets_the_think_block_opened_for_reasoning_models_only():
    from tests.tiny_gguf import old_r1_template

    def rendered(catalog_name: str | None, messages=MESSAGES) -> str:
        entry = default_catalog().get(catalog_name) if catalog_name else None
        model = ServedModel(model_id="m", engine=_Engine(), template=ChatTemplate(old_r1_template()), catalog=entry)
        prepare_chat(model, messages, ChatOptions())
        return model.engine.rendered[-1]

    assert rendered("deepseek-r1-32b").endswith("<｜Assistant｜><think>\n")
    assert rendered(None).endswith("<｜Assistant｜>")  # not known to reason: the prompt is the template's
    after_tool = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "4"}]
    assert rendered("deepseek-r1-32b", after_tool).endswith("<｜tool▁outputs▁end｜>")
