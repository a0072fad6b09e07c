"""Internal request/response types shared by every engine and every dialect.

Dialects translate their wire format into a `GenerateRequest`; engines answer with a stream of
`TokenDelta`. Nothing here knows about HTTP or llama.cpp.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from collections.abc import AsyncIterator, Iterable
from typing import Any


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # max_tokens reached
    TOOL_CALLS = "tool_calls"  # the model ended its turn with one or more tool calls
    ABORT = "abort"  # client went away or the engine shut down
    ERROR = "error"  # the engine failed this request


class RequestStatus(enum.IntEnum):
    """Life cycle of one sequence, like llama.cpp server's slot states. Finished states come last."""

    WAITING = 0
    PREFILL = 1
    DECODE = 2
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASON_BY_STATUS.get(self)


_FINISH_REASON_BY_STATUS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class ReasoningFormat(str, enum.Enum):
    """How a reasoning model's `<think>` block is returned."""

    DEEPSEEK = "deepseek"  # apart from the answer: `reasoning_content` (and `reasoning`) beside `content`
    RAW = "raw"  # inline: `<think>...</think>` then the answer, all in `content` (seed 004)
    HIDDEN = "hidden"  # dropped from the response, still counted (and billed) as completion tokens


@dataclass(slots=True, frozen=True)
class ReasoningParams:
    """Reasoning options of one request (deepserve/reasoning.py does the parsing).

    `enabled`: the model reasons (its catalog entry says so). Even when False, the engine parses reasoning
    if the rendered prompt ends inside `<think>` (the template opened it). `budget`: most reasoning tokens
    before the engine closes the block itself (None: no limit). `opened`: the prompt ends inside a `<think>`
    block the request wrote, however long (a continued message, DeepSeek's prefix): the tag, as raw output
    starts with it."""

    enabled: bool = True
    format: ReasoningFormat = ReasoningFormat.DEEPSEEK
    budget: int | None = None
    opened: str | None = None


@dataclass(slots=True, frozen=True)
class GrammarSpec:
    """A GBNF grammar the answer must follow (after the reasoning, for reasoning models)."""

    gbnf: str
    root: str = "root"


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_tokens: int = 256
    # max_tokens is a default, not the client's: a metered request may get fewer, as many as its balance covers,
    # rather than a 402 for a worst case the client never asked for (OpenRouter does the same).
    max_tokens_fits_balance: bool = False
    # llama-server's repeat_last_n: the penalties look at this many last tokens, the prompt's included (0: no
    # penalties). None: every token generated and none of the prompt, OpenAI's "tokens so far".
    penalty_last_n: int | None = None
    # llama-server's editor stops (deepserve.engine.stop.EditorStops): 0 is off
    n_indent: int = 0
    t_max_predict_ms: int = 0
    # llama.cpp's infill sampler (llama-server's samplers "infill", which llama.vim and llama.vscode send): for FIM,
    # it adds up the probabilities of tokens that are prefixes of one another and ends the answer (end of
    # generation) where the model is unsure, rather than let a low-probability tail run on.
    infill: bool = False
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # Log-probabilities of the prompt's own tokens too, with this many alternatives each (None: not wanted):
    # legacy completions with echo + logprobs, how lm-evaluation-harness scores a continuation. The prompt is
    # then computed from its first token (no prompt cache: a cached prefix has no logits).
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's -100..100)
    reasoning: ReasoningParams | None = None  # None: the output is never parsed for reasoning (completions)
    grammar: GrammarSpec | None = None  # structured output / forced tool calls
    tool_format: str | None = None  # "deepseek" | "hermes": parse the model's tool calls out of the content
    # The request's response_format as given: an upstream engine forwards it (the local engine uses `grammar`).
    response_format: dict | None = None


_request_counter = itertools.count(1)


def next_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_request_counter)}"


class Generation(str, enum.Enum):
    """How a chat prompt ends: the assistant's turn opened (the default); the last message, an assistant's,
    continued (DeepSeek's chat prefix completion, vLLM's continue_final_message); neither (vLLM's
    add_generation_prompt false)."""

    OPEN = "open"
    CONTINUE = "continue"
    NONE = "none"


@dataclass(slots=True)
class TextPrompt:
    """A prompt for an engine that renders and tokenizes it itself (an upstream server: deepserve/engine/remote).

    Exactly one of `messages` (a chat, sent with its `tools`) and `text` (a raw completion prompt) is set.
    There is no local tokenizer, so its token count is not known before the upstream reports it; `len()` is an
    upper bound (`num_tokens_bound`), which is what the callers of `len(prompt)` need: the room left in the
    context window and the worst case a reservation holds. What is charged is the upstream's own count.
    """

    messages: list[dict] | None = None
    text: str | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    generation: Generation = Generation.OPEN
    num_tokens_bound: int = 0

    def __len__(self) -> int:
        return self.num_tokens_bound


@dataclass(slots=True)
class GenerateRequest:
    """One sequence to generate. `n` > 1 in an API request becomes n GenerateRequests."""

    prompt_tokens: list[int] | TextPrompt  # TextPrompt: only for engines with `takes_text_prompts`
    sampling: SamplingParams
    request_id: str = field(default_factory=next_request_id)
    # False while an engine holds the request queued with nothing of it computed yet (an engine that queues
    # sets it at submit, and back when the request gets a slot; false again if it failed before any of it was
    # computed): a client gone before then, or a request that failed so, is charged nothing.
    started: bool = True


@dataclass(slots=True)
class TokenLogprob:
    token: str
    token_bytes: bytes
    logprob: float | None  # None: the prompt's first token (nothing came before it)
    top: list[tuple[str, bytes, float]] = field(default_factory=list)
    token_id: int | None = None  # the ids, where the engine knows them (llama-server's answers carry them)
    top_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ToolCall:
    """One complete tool call the model made; `arguments` is a JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str
    index: int = 0  # position among this choice's calls


@dataclass(slots=True)
class TokenDelta:
    """What one engine step produced for one request.

    `text` is safe to show: it never contains part of a stop string or an incomplete UTF-8 sequence.
    `reasoning_text` is the reasoning produced by this step (deepseek format only; raw puts the block in
    `text`, hidden drops it). The last delta of a request has `finish_reason` set and carries the final counts.
    """

    text: str = ""
    reasoning_text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # with the first token (prompt_logprobs)
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None  # the stop string that ended generation, if any
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    num_reasoning_tokens: int = 0  # of num_generated_tokens, those spent thinking
    error: str | None = None
    # Tokens this delta delivers when it has no ids (an upstream engine streams text): None means len(token_ids).
    token_count: int | None = None

    @property
    def num_tokens(self) -> int:
        """Generated tokens this delta delivers (what billing counts for a stream cut short)."""
        return len(self.token_ids) if self.token_count is None else self.token_count


@dataclass(slots=True)
class TokenCounts:
    num_prompt: int = 0
    num_cached: int = 0
    num_completion: int = 0  # reasoning tokens included
    num_reasoning: int = 0

    def add(self, other: TokenCounts) -> None:
        self.num_prompt += other.num_prompt
        self.num_cached += other.num_cached
        self.num_completion += other.num_completion
        self.num_reasoning += other.num_reasoning


def count_choices(num_prompt: int, choices: Iterable[Any]) -> TokenCounts:
    """Tokens of one prompt's n choices as usage counts them (billing and metrics alike): the engine's final
    counts where a choice finished, else the prompt and the tokens delivered so far. The prompt (and its cache
    hit) counts once for its n choices, as the usage the client sees counts it. `choices`: objects with
    `final` (the finishing TokenDelta or None) and `num_delivered`."""
    choices = list(choices)
    finals = [c.final for c in choices if c.final is not None]
    return TokenCounts(
        num_prompt=finals[0].num_prompt_tokens if finals else num_prompt,
        num_cached=max((f.num_cached_tokens for f in finals), default=0),
        num_completion=sum(c.final.num_generated_tokens if c.final is not None else c.num_delivered for c in choices),
        num_reasoning=sum(f.num_reasoning_tokens for f in finals),
    )


def attach_direct(stream: Any, sink: Any) -> bool:
    """Give a direct sink (api/direct.py: where the engine thread writes plain text deltas itself) to the engine
    request behind a one-choice stream, through the streams wrapped around it. False: it has no such request
    (several choices, an upstream engine)."""
    attach = getattr(stream, "attach_direct", None)
    return bool(attach is not None and attach(sink))


class StreamTap:
    """A `generate()` stream passed on unchanged, with a look at each item (`_seen`) and a hook that runs once
    when it closes (`_closed_hook`): at its end, on a failure, or when the response closes it (client gone).

    A class, not an async generator: closing one that never started still closes the stream inside it.
    What billing (MeteredStream) and the metrics (ObservedStream) wrap each request's streams with."""

    __slots__ = ("_inner", "_closed")

    def __init__(self, inner: AsyncIterator[tuple[int, TokenDelta]]):
        self._inner = inner
        self._closed = False

    def __aiter__(self) -> StreamTap:
        return self

    async def __anext__(self) -> tuple[int, TokenDelta]:
        if self._closed:
            raise StopAsyncIteration
        try:
            index, delta = await self._inner.__anext__()
        except BaseException:  # the end, a failure or a cancellation: the close hook runs now
            await self.aclose()
            raise
        await self._seen(index, delta)
        return index, delta

    async def _seen(self, index: int, delta: TokenDelta) -> None:
        """Called with each item before it is passed on."""

    def attach_direct(self, sink: Any) -> bool:
        """Pass a direct sink (api/direct.py) on to the engine request inside, and see it (`_direct_attached`)."""
        if not attach_direct(self._inner, sink):
            return False
        self._direct_attached(sink)
        return True

    def _direct_attached(self, sink: Any) -> None:
        """Called when the one choice's plain text deltas may bypass this tap (`sink` counts them)."""

    async def _closed_hook(self) -> None:
        """Called once, after the inner stream is closed."""

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            aclose: Any = getattr(self._inner, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self._closed_hook()
