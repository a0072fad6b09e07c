"""Built-in chat templates render known conversations to the exact strings the models were trained on."""

from __future__ import annotations

import pytest

from deepserve.errors import InvalidRequestError
from deepserve.templates.chat import (
    BUILTIN_TEMPLATE_NAMES,
    CHATML_TEMPLATE,
    ChatTemplate,
    builtin_template,
    choose_template_source,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, and you "
    "only answer questions related to computer science. For politically sensitive questions, security and privacy "
    "issues, and other non-computer science questions, you will refuse to answer\n"
)
# llama.cpp's tests/test-chat-template.cpp conversation
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]


def render(name: str, messages, *, eos: str = EOS, **kwargs) -> str:
    return ChatTemplate(builtin_template(name), bos_token=BOS, eos_token=eos).render(messages, **kwargs)


def test_deepseek_llm_chat_matches_the_tokenizer_config_template():
    assert render("deepseek-llm", CONVERSATION) == (
        f"{BOS}You are a helpful assistant\n\nUser: Hello\n\nAssistant: Hi there{EOS}User: Who are you\n\n"
        f"Assistant:    I am an assistant   {EOS}User: Another question\n\nAssistant:"
    )
    user = [{"role": "user", "content": "What is 2+2?"}]
    assert render("deepseek-llm", user) == f"{BOS}User: What is 2+2?\n\nAssistant:"
    assert render("deepseek-llm", user, add_generation_prompt=False) == f"{BOS}User: What is 2+2?\n\n"


def test_deepseek_coder_adds_its_default_system_prompt_and_eot():
    assert render("deepseek-coder", [{"role": "user", "content": "write a quick sort algorithm in python."}],
                  eos="<|EOT|>") == (
        f"{BOS}{CODER_SYSTEM}### Instruction:\nwrite a quick sort algorithm in python.\n### Response:\n"
    )


def test_deepseek_coder_with_a_system_message_matches_llama_cpp():
    assert render("deepseek-coder", CONVERSATION, eos="<|EOT|>") == (
        f"{BOS}You are a helpful assistant### Instruction:\nHello\n### Response:\nHi there\n<|EOT|>\n"
        "### Instruction:\nWho are you\n### Response:\n   I am an assistant   \n<|EOT|>\n"
        "### Instruction:\nAnother question\n### Response:\n"
    )


def test_deepseek_r1_opens_the_reasoning_and_ends_assistant_turns():
    assert render("deepseek-r1", CONVERSATION) == (
        f"{BOS}You are a helpful assistant<｜User｜>Hello<｜Assistant｜>Hi there{EOS}<｜User｜>Who are you"
        f"<｜Assistant｜>   I am an assistant   {EOS}<｜User｜>Another question<｜Assistant｜><think>\n"
    )
    assert render("deepseek-r1", [{"role": "user", "content": "Hi"}], add_generation_prompt=False) == f"{BOS}<｜User｜>Hi"


def test_deepseek_r1_drops_earlier_reasoning_from_history():
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
    ]
    assert render("deepseek-r1", messages) == (
        f"{BOS}<｜User｜>2+2?<｜Assistant｜>\n\n4{EOS}<｜User｜>3+3?<｜Assistant｜><think>\n"
    )


def test_deepseek_r1_joins_system_messages():
    messages = [{"role": "system", "content": "A."}, {"role": "system", "content": "B."},
                {"role": "user", "content": "Q"}]
    assert render("deepseek-r1", messages) == f"{BOS}A.\n\nB.<｜User｜>Q<｜Assistant｜><think>\n"


def test_deepseek_r1_tool_calls_and_outputs():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}},
        ]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "18C at noon."},
    ]
    assert render("deepseek-r1", messages, add_generation_prompt=False) == (
        f"{BOS}<｜User｜>Weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
        'get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
        'get_time\n```json\n{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' + EOS
        + "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>12:00"
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>18C at noon." + EOS
    )


def test_chatml_is_the_fallback():
    assert CHATML_TEMPLATE == builtin_template("chatml")
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render("chatml", [{"role": "user", "content": "Hi"}]) == expected


def test_every_builtin_template_renders_a_plain_conversation():
    for name in BUILTIN_TEMPLATE_NAMES:
        assert "Another question" in render(name, CONVERSATION)


def test_unknown_template_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="deepseek-r1"):
        builtin_template("vicuna")


def test_template_choice_operator_then_gguf_then_catalog_then_chatml():
    gguf = "{{ 'gguf' }}"
    r1 = builtin_template("deepseek-r1")
    assert choose_template_source(operator="deepseek-r1", gguf=gguf, catalog="deepseek-llm") == r1
    assert choose_template_source(operator=None, gguf=gguf, catalog="deepseek-llm") == gguf
    assert choose_template_source(operator=None, gguf=None, catalog="deepseek-llm") == builtin_template("deepseek-llm")
    assert choose_template_source(operator=None, gguf=None, catalog=None) == CHATML_TEMPLATE


def test_raise_exception_in_a_template_is_a_request_error():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        template.render([{"role": "user", "content": "x"}])
