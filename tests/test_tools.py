"""Tool calls: both call syntaxes parsed from streams split anywhere, the request checks, the template side,
and the grammars that force a call."""

from __future__ import annotations

import json

import pytest

from deepserve.errors import InvalidRequestError
from deepserve.tools import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    DEEPSEEK,
    HERMES,
    SEP,
    ToolCallParser,
    check_tools,
    prepare_tool_messages,
    tool_call_grammar,
    tool_format_for,
)
from deepserve.templates.chat import builtin_template

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def parse(fmt: str, pieces: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    parser = ToolCallParser(fmt)
    content, calls = "", []
    for piece in pieces:
        text, new = parser.feed(piece)
        content += text
        calls += new
    text, new = parser.flush()
    content += text
    calls += new
    assert [c.index for c in calls] == list(range(len(calls)))
    assert all(c.id.startswith("call_") for c in calls)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def splits(text: str):
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)


DEEPSEEK_OUTPUT = (f"Let me check.{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```"
                   f"{CALL_END}\n{CALL_BEGIN}function{SEP}get_time\n```json\n{{}}\n```{CALL_END}{CALLS_END}")
HERMES_OUTPUT = ('I will call it.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                 '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
EXPECTED_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.mark.parametrize(("fmt", "output", "content"), [
    (DEEPSEEK, DEEPSEEK_OUTPUT, "Let me check."),
    (HERMES, HERMES_OUTPUT, "I will call it.\n"),
])
def test_calls_parse_whatever_the_split(fmt, output, content):
    for pieces in splits(output):
        assert parse(fmt, pieces) == (content, EXPECTED_CALLS), pieces


def test_deepseek_v31_syntax_and_a_call_cut_short():
    v31 = f"{CALLS_BEGIN}{CALL_BEGIN}get_time{SEP}{{\"tz\": \"UTC\"}}{CALL_END}{CALLS_END}"
    assert parse(DEEPSEEK, [v31]) == ("", [("get_time", {"tz": "UTC"})])
    # max_tokens ended the output before the end markers: the call is kept if it parses
    cut = f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_time\n```json\n{{}}\n```"
    assert parse(DEEPSEEK, [cut]) == ("", [("get_time", {})])
    assert parse(HERMES, ['<tool_call>{"name": "get_time", "arguments": {}}']) == ("", [("get_time", {})])


def test_max_tokens_cutting_one_more_call_leaves_no_markup_in_content():
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
    # cut inside the end marker: the call is whole, so it counts
    assert parse(HERMES, [call + call[:-3]]) == ("", [("get_time", {}), ("get_time", {})])
    assert parse(HERMES, [call + "<"]) == ("", [("get_time", {})])  # the next call's first character
    assert parse(HERMES, [call + '<tool_call>\n{"name": "get_t']) == ("", [("get_time", {})])
    ds_call = f"{CALL_BEGIN}function{SEP}get_time\n```json\n{{}}\n```{CALL_END}"
    assert parse(DEEPSEEK, [CALLS_BEGIN + ds_call + ds_call[:-4]]) == ("", [("get_time", {}), ("get_time", {})])


def test_a_call_cut_short_is_the_call_as_far_as_it_got():
    """max_tokens ends the answer inside a call: its name and the arguments written so far come back as the call
    (not JSON yet), as OpenAI returns a call cut by its limit, never its markup as content."""
    def cut(fmt: str, text: str) -> tuple[str, list[tuple[str, str]]]:
        parser = ToolCallParser(fmt)
        content, calls = parser.feed(text)
        rest, more = parser.flush()
        return content + rest, [(c.name, c.arguments) for c in calls + more]

    assert cut(HERMES, '<tool_call>\n{"name": "get_weather", "argu') == ("", [("get_weather", "")])
    assert cut(HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa') == (
        "", [("get_weather", '{"city": "Pa')])
    deepseek = CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n{\"city\": \"Pa"
    assert cut(DEEPSEEK, deepseek) == ("", [("get_weather", '{"city": "Pa')])
    assert cut(HERMES, '<tool_call>\n{"na') == ('<tool_call>\n{"na', [])  # no name yet: no call to return


def test_text_that_is_not_a_call_stays_content():
    assert parse(HERMES, ["a <tool_", "callx> b"]) == ("a <tool_callx> b", [])
    assert parse(HERMES, ["<tool_call>not json</tool_call>"]) == ("<tool_call>not json</tool_call>", [])
    assert parse(DEEPSEEK, ["plain answer"]) == ("plain answer", [])


ALLOW_TIME = {"type": "function", "function": {"name": "get_time"}}


def test_allowed_tools_narrow_the_tools_and_keep_the_mode():
    """OpenAI's tool_choice {"type": "allowed_tools"} (typed in the openai SDK): only the named tools may be called,
    with mode auto (may answer in text) or required (must call one of them)."""
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [ALLOW_TIME]}}
    functions, forced = check_tools([WEATHER, TIME], choice)
    assert [f["name"] for f in functions] == ["get_time"] and forced == "*"
    choice["allowed_tools"]["mode"] = "auto"
    functions, forced = check_tools([WEATHER, TIME], choice)
    assert [f["name"] for f in functions] == ["get_time"] and forced is None


def test_check_tools():
    functions, forced = check_tools([WEATHER, TIME], None)
    assert [f["name"] for f in functions] == ["get_weather", "get_time"] and forced is None
    assert check_tools([WEATHER], "none") == ([], None)
    assert check_tools([WEATHER], "required")[1] == "*"
    assert check_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})[1] == "get_time"
    assert check_tools([TIME], "auto")[0][0]["parameters"] == {"type": "object", "properties": {}}
    for tools, choice, message in [
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "'nope', which is not among the tools"),
        ([], "required", "no tools were given"),
        ([{"type": "code_interpreter"}], None, "only tools of type 'function'"),
        ([{"type": "function", "function": {}}], None, "function.name is required"),
        ([WEATHER], "sometimes", "tool_choice must be"),
        ([WEATHER], {"type": "function", "function": "get_weather"}, "tool_choice must name a function"),
        ([WEATHER], {"type": "function", "function": ["get_weather"]}, "tool_choice must name a function"),
        ([WEATHER], {"type": "allowed_tools", "allowed_tools": {"mode": "sometimes", "tools": [ALLOW_TIME]}},
         "allowed_tools must be"),
        ([WEATHER], {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, "allowed_tools must be"),
        ([WEATHER], {"type": "allowed_tools", "allowed_tools": {"tools": ["get_weather"]}}, "allowed_tools must be"),
        ([WEATHER], {"type": "allowed_tools", "allowed_tools": {"tools": [ALLOW_TIME]}}, "'get_time', which is not"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            check_tools(tools, choice)


def test_templates_choose_their_syntax_and_get_the_tools():
    assert tool_format_for(builtin_template("deepseek-r1")) == DEEPSEEK
    assert tool_format_for(builtin_template("chatml")) == HERMES
    functions, _ = check_tools([WEATHER], None)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    # a template that knows neither tools nor tool_calls: both spelled out in the model's syntax
    messages, kwargs = prepare_tool_messages(history, functions, builtin_template("chatml"), HERMES)
    assert kwargs == {}
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                      '</tool_call>') and "tool_calls" not in messages[2]
    assert messages[3] == history[2]
    # DeepSeek-R1's template writes tool_calls itself: they pass through
    messages, _ = prepare_tool_messages(history, functions, builtin_template("deepseek-r1"), DEEPSEEK)
    assert messages[2] == history[1]
    # a template that takes `tools` gets them as a variable
    messages, kwargs = prepare_tool_messages(history[:1], functions, "{% for t in tools %}{% endfor %}", HERMES)
    assert kwargs["tools"][0]["function"]["name"] == "get_weather" and messages == history[:1]


def test_forced_call_grammars_name_the_function_and_the_syntax():
    functions, _ = check_tools([WEATHER, TIME], None)
    named = tool_call_grammar(functions, "get_time", HERMES, parallel=False)
    assert named.root == "tool-calls" and '\\"get_time\\"' in named.gbnf and '\\"get_weather\\"' not in named.gbnf
    anyone = tool_call_grammar(functions, "*", DEEPSEEK)
    assert "get_weather" in anyone.gbnf and "get_time" in anyone.gbnf and f'"{CALLS_BEGIN}"' in anyone.gbnf
    # markers that are one token of the vocabulary are asked for as that token (GBNF <token>), not spelled
    tokens = tool_call_grammar(functions, "*", DEEPSEEK, single_tokens={CALLS_BEGIN})
    assert f"tool-calls ::= {CALLS_BEGIN} tool-call" in tokens.gbnf
    with pytest.raises(InvalidRequestError, match="'minimum' is not supported on type 'number'"):
        tool_call_grammar([{"name": "f", "parameters": {"type": "number", "minimum": 1}}], "f", HERMES)
