"""Tool calls: the model's call syntax parsed out of its answer, tools described to the template, and the
grammar that forces a call (`tool_choice: required` or a named function).

Two syntaxes, chosen by the model's chat template:
- "deepseek" (DeepSeek-V3 / R1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n
  {...}\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>` (V3.1's `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}` too);
- "hermes" (Qwen, Hermes, ChatML models): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from deepserve.engine.types import GrammarSpec, ToolCall
from deepserve.errors import InvalidRequestError

DEEPSEEK = "deepseek"
HERMES = "hermes"

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
HERMES_BEGIN = "<tool_call>"
HERMES_END = "</tool_call>"


def tool_format_for(template_source: str) -> str:
    """The call syntax a chat template speaks."""
    return DEEPSEEK if "tool▁calls▁begin" in template_source or "tool▁call▁begin" in template_source else HERMES


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        json.loads(arguments)  # must be JSON; ValueError otherwise
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _longest_partial(text: str, markers: tuple[str, ...]) -> int:
    best = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:length]):
                best = length
                break
    return best


# A call cut short: its name complete, its arguments (if begun) as far as they got.
_HERMES_CUT = re.compile(r'^\s*\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*(?:,(?P<rest>.*))?$', re.DOTALL)
_HERMES_CUT_ARGS = re.compile(r'^\s*"(?:arguments|parameters)"\s*:\s*(?P<args>.*)$', re.DOTALL)
_DEEPSEEK_CUT = re.compile(r"^\s*[^\n<]*?\s*" + re.escape(SEP) + r"(?P<name>[^\n]+?)\s*\n(?P<rest>.*)$", re.DOTALL)
_FENCE_CUT = re.compile(r"^`{1,3}(?:j(?:s(?:o(?:n)?)?)?)?\s*")  # the arguments' opening ``` json fence, perhaps cut
_DEEPSEEK_CALL = re.compile(r"^\s*(?P<type>[^\n<]*?)\s*" + re.escape(SEP) + r"(?P<name>[^\n]+?)\s*\n```(?:json)?\s*\n"
                            r"(?P<args>.*?)\s*```\s*$", re.DOTALL)


class ToolCallParser:
    """Streaming: `feed(text)` returns (content, complete calls). Text that may start a call marker is held
    back; a call is returned once it is complete. A call that does not parse stays content."""

    def __init__(self, fmt: str, *, forced: bool = False):
        if fmt not in (DEEPSEEK, HERMES):
            raise ValueError(f"unknown tool call format {fmt!r}")
        self.format = fmt
        self.forced = forced  # a grammar makes the answer a call: markup cut too early to be one is dropped
        self._begin = (CALLS_BEGIN, CALL_BEGIN) if fmt == DEEPSEEK else (HERMES_BEGIN,)
        self._in_calls = False  # inside the call section
        self._buffer = ""  # text of the call section not yet parsed
        self._held = ""  # content that may be the start of a begin marker
        self._after_calls = False  # a call section just ended
        self._section_marker = ""  # the marker that opened the current section (for text that was no call)
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []
        content: list[str] = []
        text = self._held + text
        self._held = ""
        while text:
            if not self._in_calls:
                if self._after_calls:  # whitespace between or after calls is dropped
                    stripped = text.lstrip()
                    if not stripped:
                        self._held = text
                        break
                    text = stripped
                    self._after_calls = False
                hits = [(text.find(m), m) for m in self._begin if m in text]
                if hits:
                    at, marker = min(hits)
                    if at:
                        content.append(text[:at])
                    self._in_calls = True
                    # The section marker is dropped; DeepSeek's bare call marker stays for the call parser.
                    self._section_marker = marker if marker in (CALLS_BEGIN, HERMES_BEGIN) else ""
                    text = text[at + len(self._section_marker):]
                    continue
                keep = _longest_partial(text, self._begin)
                content.append(text[: len(text) - keep])
                self._held = text[len(text) - keep:]
                break
            self._buffer += text
            text = self._drain(calls, content)
        return "".join(content), calls

    def _drain(self, calls: list[ToolCall], content: list[str]) -> str:
        """Parse the complete calls in the buffer; return text after the call section (content again)."""
        if self.format == HERMES:
            end = self._buffer.find(HERMES_END)
            if end < 0:
                return ""
            self._add(calls, content, self._hermes(self._buffer[:end]),
                      HERMES_BEGIN + self._buffer[: end + len(HERMES_END)])
            rest = self._buffer[end + len(HERMES_END):]
            self._buffer = ""
            self._in_calls = False
            self._after_calls = True
            return rest
        while True:
            buf = self._buffer
            end_section = buf.find(CALLS_END)
            begin = buf.find(CALL_BEGIN)
            if begin >= 0 and (end_section < 0 or begin < end_section):
                end = buf.find(CALL_END, begin)
                if end < 0:
                    return ""
                body = buf[begin + len(CALL_BEGIN): end]
                self._add(calls, content, self._deepseek(body), buf[begin: end + len(CALL_END)])
                self._buffer = buf[end + len(CALL_END):]
                continue
            if end_section >= 0:
                self._buffer = ""
                self._in_calls = False
                self._after_calls = True
                return buf[end_section + len(CALLS_END):]
            return ""

    def _add(self, calls: list[ToolCall], content: list[str], parsed: tuple[str, str] | None, raw: str) -> None:
        if parsed is None:
            content.append(raw)  # not a call after all: its text stays content, so nothing is lost
            return
        name, arguments = parsed
        calls.append(ToolCall(id=new_call_id(), name=name, arguments=arguments, index=self.num_calls))
        self.num_calls += 1

    @staticmethod
    def _hermes(body: str) -> tuple[str, str] | None:
        try:
            data = json.loads(body.strip())
            name = data["name"]
            arguments = _arguments_text(data.get("arguments", data.get("parameters", {})))
        except (ValueError, KeyError, TypeError):
            return None
        return (name, arguments) if isinstance(name, str) and name else None

    @staticmethod
    def _deepseek(body: str) -> tuple[str, str] | None:
        match = _DEEPSEEK_CALL.match(body)
        try:
            if match:
                return match["name"].strip(), _arguments_text(match["args"])
            if SEP in body:  # V3.1: NAME<｜tool▁sep｜>{arguments}
                name, arguments = body.split(SEP, 1)
                name = name.strip()
                return (name, _arguments_text(arguments.strip())) if name else None
        except ValueError:
            return None
        return None

    def flush(self) -> tuple[str, list[ToolCall]]:
        """The end of the output. A call cut short (max_tokens) or never closed is kept: whole if it parses, else as
        far as it got once its name is whole (arguments not JSON yet, as OpenAI returns a cut call). Once the
        answer has made calls, what follows them unfinished (the start of one more call, cut off) is dropped:
        markup is no answer, and a client shows `content` next to `tool_calls`."""
        calls: list[ToolCall] = []
        made_calls = self.num_calls > 0
        content = "" if made_calls or (self._after_calls and not self._held.strip()) else self._held
        self._held = ""
        if self._in_calls and self._buffer.strip():
            raw = self._section_marker + self._buffer
            buf = self._buffer.strip()
            buf = buf[: len(buf) - _longest_partial(buf, (HERMES_END, CALL_END, CALLS_END))].strip()  # cut in its end
            self._buffer = ""
            if self.format == HERMES:
                parsed = self._hermes(buf)
            else:
                parsed = self._deepseek(buf.removeprefix(CALL_BEGIN).removesuffix(CALL_END))
            if parsed is None:  # cut inside it: the call as far as it got, as OpenAI returns one cut by max_tokens
                parsed = self._cut_call(buf)
            if parsed is not None:
                calls.append(ToolCall(id=new_call_id(), name=parsed[0], arguments=parsed[1], index=self.num_calls))
                self.num_calls += 1
            elif not made_calls and not self.forced:
                content += raw
        self._in_calls = False
        return content, calls

    def _cut_call(self, buf: str) -> tuple[str, str] | None:
        """A call whose name is written whole and whose arguments may be cut short (not JSON yet)."""
        match = (_HERMES_CUT if self.format == HERMES else _DEEPSEEK_CUT).match(buf.removeprefix(CALL_BEGIN))
        if match is None:
            return None
        rest = match["rest"] or ""
        if self.format == HERMES:  # after the name: the arguments' key, perhaps cut too, then their text
            args = _HERMES_CUT_ARGS.match(rest)
            rest = args["args"] if args else ""
        else:
            rest = _FENCE_CUT.sub("", rest)
        return match["name"].strip(), rest.strip()


# ---- the request side -----------------------------------------------------------------------------------------------


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Validate OpenAI `tools` / `tool_choice`. Returns (function definitions, forced: None for auto,
    "*" for required, else the function name); `tool_choice: none` returns no tools."""
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError(f"tools[{i}]: only tools of type 'function' are supported.", param="tools")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError(f"tools[{i}].function.name is required.", param="tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object.", param="tools")
        functions.append({**function, "parameters": parameters})
    names = [f["name"] for f in functions]
    if tool_choice is None or tool_choice == "auto":
        return functions, None
    if tool_choice == "none":
        return [], None
    if tool_choice == "required":
        if not functions:
            raise InvalidRequestError("tool_choice is 'required' but no tools were given.", param="tool_choice")
        return functions, "*"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        return _allowed_tools(functions, tool_choice.get("allowed_tools"))
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function") if tool_choice.get("type", "function") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError("tool_choice must name a function: {\"type\": \"function\", "
                                      "\"function\": {\"name\": ...}}.", param="tool_choice")
        if name not in names:
            raise InvalidRequestError(f"tool_choice names the function '{name}', which is not among the tools.",
                                      param="tool_choice")
        return functions, name
    raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required', a named function or allowed_tools.",
                              param="tool_choice")


def _allowed_tools(functions: list[dict[str, Any]], allowed: Any) -> tuple[list[dict[str, Any]], str | None]:
    """OpenAI's `tool_choice: {"type": "allowed_tools", "allowed_tools": {"mode": "auto" | "required", "tools":
    [{"type": "function", "function": {"name": ...}}, ...]}}`: only those tools may be called. Only they are shown
    to the model, so that it cannot call the others (OpenAI keeps the whole list in the prompt for its prompt
    cache; here the prompt cache matches on the tokens, so a list that changes between turns costs a recompute)."""
    shape = ('tool_choice.allowed_tools must be {"mode": "auto" | "required", "tools": [{"type": "function", '
             '"function": {"name": ...}}, ...]}.')
    if not isinstance(allowed, dict) or allowed.get("mode", "auto") not in ("auto", "required") \
            or not isinstance(allowed.get("tools"), list) or not allowed["tools"]:
        raise InvalidRequestError(shape, param="tool_choice")
    names = []
    for tool in allowed["tools"]:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(shape, param="tool_choice")
        names.append(function["name"])
    unknown = sorted(set(names) - {f["name"] for f in functions})
    if unknown:
        raise InvalidRequestError(f"tool_choice.allowed_tools names {', '.join(map(repr, unknown))}, which "
                                  f"{'is' if len(unknown) == 1 else 'are'} not among the tools.", param="tool_choice")
    return [f for f in functions if f["name"] in names], "*" if allowed.get("mode") == "required" else None


MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, HERMES_BEGIN, HERMES_END)


def tool_call_grammar(functions: list[dict[str, Any]], forced: str, fmt: str, *, parallel: bool = True,
                      single_tokens: frozenset[str] | set[str] = frozenset()) -> GrammarSpec:
    """A grammar whose every sentence is a well-formed call (one, or up to four in a row when `parallel`)
    of `forced` ("*": any of the functions) with arguments matching its parameters schema.

    `single_tokens`: the call markers that are one token of the model's vocabulary; the grammar then asks
    for that token (GBNF `<token>`), as the model was trained to write it, rather than its spelling."""
    from deepserve.structured import SchemaConverterError, new_converter, finish_grammar, literal

    def marker(text: str) -> str:
        return text if text in single_tokens else literal(text)

    chosen = [f for f in functions if forced in ("*", f["name"])]
    converter = new_converter()
    alternatives = []
    for i, function in enumerate(chosen):
        try:
            arguments = converter.visit_checked(function["parameters"], f"fn{i}-args",
                                                where=f"tools[{function['name']}].function.parameters")
        except SchemaConverterError as error:
            raise InvalidRequestError(str(error), param="tools") from None
        if fmt == DEEPSEEK:
            alternatives.append(f'"function" {marker(SEP)} {literal(function["name"] + chr(10) + "```json" + chr(10))} '
                                f'{arguments} {literal(chr(10) + "```")}')
        else:
            name = literal(json.dumps(function["name"]))
            alternatives.append(f'"{{" space {literal(chr(34) + "name" + chr(34))} space ":" space {name} space "," space '
                                f'{literal(chr(34) + "arguments" + chr(34))} space ":" space {arguments} "}}"')
    rules = [f"tool-call-body ::= {' | '.join(alternatives)}"]
    more = ' ("\\n" tool-call (("\\n" tool-call) ("\\n" tool-call)?)?)?' if parallel else ""
    if fmt == DEEPSEEK:
        rules.append(f"tool-call ::= {marker(CALL_BEGIN)} tool-call-body {marker(CALL_END)}")
        rules.append(f"tool-calls ::= {marker(CALLS_BEGIN)} tool-call{more} {marker(CALLS_END)}")
    else:
        rules.append(f'tool-call ::= {marker(HERMES_BEGIN)} "\\n" tool-call-body "\\n" {marker(HERMES_END)}')
        rules.append(f"tool-calls ::= tool-call{more}")
    return finish_grammar(converter, rules, root="tool-calls")


def _call_text(call: dict[str, Any], fmt: str) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if fmt == DEEPSEEK:
        return f"{CALL_BEGIN}function{SEP}{function.get('name', '')}\n```json\n{arguments}\n```{CALL_END}"
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = arguments
    return f"{HERMES_BEGIN}\n{json.dumps({'name': function.get('name', ''), 'arguments': parsed}, ensure_ascii=False)}\n{HERMES_END}"


def _tools_system_text(functions: list[dict[str, Any]], fmt: str) -> str:
    described = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    if fmt == DEEPSEEK:
        how = (f"To call a function, answer with {CALLS_BEGIN}{CALL_BEGIN}function{SEP}NAME\n```json\n"
               f"ARGUMENTS\n```{CALL_END}{CALLS_END}, where ARGUMENTS is a JSON object.")
    else:
        how = (f"To call a function, answer with {HERMES_BEGIN}\n{{\"name\": NAME, \"arguments\": ARGUMENTS}}\n"
               f"{HERMES_END}, where ARGUMENTS is a JSON object.")
    return f"You may call these functions:\n{described}\n{how}"


def prepare_tool_messages(messages: list[dict[str, Any]], functions: list[dict[str, Any]], template_source: str,
                          fmt: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages and template variables for a conversation with tools.

    Templates that take `tools` get them; for the others the tools are described in the system message.
    Assistant turns with `tool_calls` become the model's own call syntax where the template cannot write
    them; `tool` turns pass to the template as they are."""
    template_kwargs: dict[str, Any] = {}
    takes_tools = re.search(r"\btools\b", template_source) is not None
    takes_calls = "tool_calls" in template_source
    out: list[dict[str, Any]] = []
    for message in messages:
        if not takes_calls and message.get("role") == "assistant" and message.get("tool_calls"):
            calls = "".join(_call_text(c, fmt) for c in message["tool_calls"])
            if fmt == DEEPSEEK:
                calls = CALLS_BEGIN + calls + CALLS_END
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = (message.get("content") or "") + calls
        out.append(message)
    if functions:
        tools = [{"type": "function", "function": f} for f in functions]
        if takes_tools:
            template_kwargs["tools"] = tools
        else:
            text = _tools_system_text(functions, fmt)
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
            else:
                out.insert(0, {"role": "system", "content": text})
    return out, template_kwargs
