"""Reasoning models: the `<think>...</think>` block, in one place for the engine and every dialect.

- `ThinkParser` splits a stream of text pieces into reasoning and content. It is correct whatever the
  boundaries: a tag split across tokens (or at any byte), a prompt that already opened `<think>` (DeepSeek-R1's
  template ends the prompt with `<think>\\n`, so the output has no opening tag), a block never closed, and
  no reasoning at all. Text that may be the start of a tag is held back until it is known.
- `ReasoningShaper` applies the output style of a request (`ReasoningFormat`): deepseek (apart, trimmed),
  raw (inline, byte for byte what the model wrote, after the prompt's opening tag) or hidden (dropped).
- `budget_for()` maps `reasoning_effort` / `max_reasoning_tokens` to a token budget (EFFORT_BUDGETS).
- `strip_reasoning_history()` removes earlier reasoning from a conversation before it is templated.
- `open_reasoning()` opens the block at the end of an R1 prompt whose template does not (older GGUFs).

The engine (deepserve/engine/llamacpp/loop.py) runs one parser per sequence, feeds it every token's text,
counts reasoning tokens, and closes the block itself when the budget is spent.
"""

from __future__ import annotations

import enum
import re
from typing import Any

from deepserve.engine.types import ReasoningFormat

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"
FORCED_CLOSE = CLOSE_TAG + "\n\n"  # what the engine feeds when the reasoning budget is spent

# reasoning_effort -> most reasoning tokens (None: no limit). OpenAI's SDK sends any of these names.
EFFORT_BUDGETS: dict[str, int | None] = {
    "none": 0,
    "minimal": 256,
    "low": 1024,
    "medium": 4096,
    "high": 16384,
    "xhigh": None,
    "max": None,
}


def budget_for(effort: str | None, max_reasoning_tokens: int | None) -> int | None:
    """The reasoning budget of a request: an explicit `max_reasoning_tokens` wins over `reasoning_effort`."""
    if max_reasoning_tokens is not None:
        return max_reasoning_tokens
    if effort is None:
        return None
    return EFFORT_BUDGETS[effort]


class Part(enum.Enum):
    OPEN = "open"  # the opening tag (with any whitespace before it), as the model wrote it
    REASONING = "reasoning"
    CLOSE = "close"  # the closing tag
    CONTENT = "content"


class _State(enum.Enum):
    START = 0  # nothing decided yet: the output may open with `<think>` (after whitespace)
    REASONING = 1
    CONTENT = 2


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ThinkParser:
    """Streaming `<think>` splitter. `feed()` returns the parts that are certain, in order.

    `starts_in_reasoning`: the prompt already opened `<think>`, so everything up to `</think>` is reasoning
    (a repeated `<think>` at the very start is taken as the opening tag). Otherwise the output reasons only
    if it opens with `<think>` (after optional whitespace); anything else makes it all content.
    """

    def __init__(self, *, starts_in_reasoning: bool):
        self.starts_in_reasoning = starts_in_reasoning
        self._state = _State.START
        self._held = ""

    @property
    def in_reasoning(self) -> bool:
        """The next text is (still) reasoning."""
        return self._state == _State.REASONING or (self._state == _State.START and self.starts_in_reasoning)

    @property
    def closed(self) -> bool:
        """The reasoning block has ended (or there is none): what follows is the answer."""
        return self._state == _State.CONTENT

    @property
    def answering(self) -> bool:
        """The next text is the answer, or may be: a grammar on the answer may apply from here."""
        return self._state == _State.CONTENT or (self._state == _State.START and not self.starts_in_reasoning)

    def feed(self, text: str) -> list[tuple[Part, str]]:
        parts: list[tuple[Part, str]] = []
        text = self._held + text
        self._held = ""
        while text:
            if self._state == _State.START:
                stripped = text.lstrip()
                if stripped.startswith(OPEN_TAG):
                    opened = len(text) - len(stripped) + len(OPEN_TAG)
                    parts.append((Part.OPEN, text[:opened]))
                    text = text[opened:]
                    self._state = _State.REASONING
                elif OPEN_TAG.startswith(stripped):  # only whitespace, or a partial tag so far: wait
                    self._held = text
                    return parts
                else:
                    self._state = _State.REASONING if self.starts_in_reasoning else _State.CONTENT
            elif self._state == _State.REASONING:
                at = text.find(CLOSE_TAG)
                if at >= 0:
                    if at:
                        parts.append((Part.REASONING, text[:at]))
                    parts.append((Part.CLOSE, CLOSE_TAG))
                    text = text[at + len(CLOSE_TAG):]
                    self._state = _State.CONTENT
                else:
                    keep = _partial_suffix(text, CLOSE_TAG)
                    if len(text) > keep:
                        parts.append((Part.REASONING, text[: len(text) - keep]))
                    self._held = text[len(text) - keep:]
                    return parts
            else:
                parts.append((Part.CONTENT, text))
                return parts
        return parts

    def flush(self) -> list[tuple[Part, str]]:
        """The end of the output: text held back turned out not to be a tag."""
        held, self._held = self._held, ""
        if not held:
            return []
        if self._state == _State.START and not self.starts_in_reasoning:
            self._state = _State.CONTENT
            return [(Part.CONTENT, held)]
        if self._state == _State.CONTENT:
            return [(Part.CONTENT, held)]
        if self._state == _State.REASONING:
            # A proper prefix of `</think>` cut off by max_tokens (the model's close, or the engine's forced
            # one): markup, not a thought.
            return []
        return [(Part.REASONING, held)]


class ReasoningShaper:
    """A ThinkParser plus the request's output style. `feed()` returns (reasoning, shown, content):

    - reasoning: text for `reasoning_content` (deepseek style only), trimmed: no whitespace at its start or
      before `</think>` (trailing whitespace waits until more reasoning follows);
    - shown: text that goes straight into `content` (raw style: the block itself, tags included);
    - content: the answer, which the engine still passes through stop strings and the tool-call parser
      (deepseek and hidden styles drop the whitespace between `</think>` and the answer).
    """

    def __init__(self, fmt: ReasoningFormat, *, starts_in_reasoning: bool, raw_prefix: str = ""):
        self.format = fmt
        self.parser = ThinkParser(starts_in_reasoning=starts_in_reasoning)
        self._raw_prefix = raw_prefix if fmt == ReasoningFormat.RAW else ""
        self._reasoning_started = False
        self._pending_ws = ""
        self._content_started = False
        self._after_close = False

    def feed(self, text: str) -> tuple[str, str, str]:
        return self._shape(self.parser.feed(text))

    def flush(self) -> tuple[str, str, str]:
        return self._shape(self.parser.flush())

    def _shape(self, parts: list[tuple[Part, str]]) -> tuple[str, str, str]:
        reasoning: list[str] = []
        shown: list[str] = []
        content: list[str] = []
        if self._raw_prefix and parts:
            shown.append(self._raw_prefix)
            self._raw_prefix = ""
        for part, text in parts:
            if part == Part.CONTENT:
                if self._after_close and not self._content_started and self.format != ReasoningFormat.RAW:
                    text = text.lstrip()
                if text:
                    self._content_started = True
                    content.append(text)
                continue
            if part == Part.CLOSE:
                self._after_close = True
                self._pending_ws = ""
            if self.format == ReasoningFormat.RAW:
                shown.append(text)
            elif self.format == ReasoningFormat.DEEPSEEK and part == Part.REASONING:
                reasoning.append(self._trim(text))
        return "".join(reasoning), "".join(shown), "".join(content)

    def _trim(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip()
            if not text:
                return ""
            self._reasoning_started = True
        text = self._pending_ws + text
        core = text.rstrip()
        self._pending_ws = text[len(core):]
        return core


def prompt_reasoning_prefix(prompt_tail: str) -> str | None:
    """If a prompt ends inside `<think>` (the template opened the block), the text from that tag on
    (e.g. "<think>\\n"), else None. A `<think>` followed by a chat marker (`<|...|>`, `<｜...｜>`) is only text
    of an earlier turn: the prompt does not end inside it."""
    at = prompt_tail.rfind(OPEN_TAG)
    if at < 0:
        return None
    after = prompt_tail[at + len(OPEN_TAG):]
    if CLOSE_TAG in after or "<|" in after or "<｜" in after:
        return None
    return prompt_tail[at:]


# DeepSeek-R1's generation prompt. Templates older than DeepSeek's revision (e.g. most R1-distill GGUFs of
# January 2025) end the prompt here; the revised one adds "<think>\n".
R1_ASSISTANT = "<｜Assistant｜>"


def open_reasoning(prompt: str) -> str:
    """The prompt of a reasoning model, ending inside `<think>` as DeepSeek advises ("enforce the model to
    initiate its response with <think>\n"): an R1 prompt that ends at the assistant marker gets "<think>\n".

    Without it the model writes the tag itself, and what needs the block open from the first output token
    breaks: a grammar on the answer would apply from that token and forbid the reasoning, and the output
    would not have seed 004's shape. Any other prompt (one the template opened already, one that ends after
    tool outputs, another family's) is left as it is."""
    if prompt.endswith(R1_ASSISTANT):
        return prompt + OPEN_TAG + "\n"
    return prompt


_THINK_BLOCK = re.compile(re.escape(OPEN_TAG) + r".*?" + re.escape(CLOSE_TAG), re.DOTALL)


def strip_reasoning(text: str) -> str:
    """An assistant turn without its reasoning: `<think>...</think>` blocks go, and so does everything up to
    a `</think>` whose `<think>` was in the prompt (R1's template opens the block itself)."""
    if OPEN_TAG not in text and CLOSE_TAG not in text:
        return text
    text = _THINK_BLOCK.sub("", text)
    if CLOSE_TAG in text:
        text = text.rsplit(CLOSE_TAG, 1)[1]
    if OPEN_TAG in text:  # a block never closed: all of it was reasoning
        text = text.split(OPEN_TAG, 1)[0]
    return text.strip()


def strip_reasoning_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for the template, without earlier reasoning (DeepSeek's guidance for multi-turn R1):
    assistant turns lose `reasoning_content` / `reasoning` fields and inline `<think>` blocks."""
    cleaned = []
    for message in messages:
        if message.get("role") == "assistant":
            message = {k: v for k, v in message.items() if k not in ("reasoning_content", "reasoning")}
            if isinstance(message.get("content"), str):
                message["content"] = strip_reasoning(message["content"])
        cleaned.append(message)
    return cleaned
