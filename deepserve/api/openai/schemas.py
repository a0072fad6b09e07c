"""OpenAI-compatible request bodies. Unknown fields are ignored, as OpenAI-compatible servers do."""

from __future__ import annotations

from dataclasses import replace
import types
import typing
from typing import Any, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator,
                      model_validator)

from deepserve.chat_options import ChatOptions
from deepserve.engine.types import Generation, SamplingParams
from deepserve.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_N = 16


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # JSON's Infinity / NaN literals: 400

    @model_validator(mode="before")
    @classmethod
    def _null_means_omitted(cls, data: Any) -> Any:
        """An explicit null on a field with a default (n, stream, the penalties, logprobs, echo...) means that
        default, as OpenAI and llama-server read it: the openai SDK sends null for an argument passed as None,
        and so do clients that serialise unset fields. (A required field's null is still refused.)"""
        if isinstance(data, dict) and None in data.values():
            defaulted = _defaulted_keys(cls)
            data = {key: value for key, value in data.items() if value is not None or key not in defaulted}
        return data


_DEFAULTED_KEYS: dict[type, frozenset[str]] = {}


def _defaulted_keys(model: type[BaseModel]) -> frozenset[str]:
    """The keys (names and aliases) of `model`'s fields that have a default and whose type does not take None."""
    keys = _DEFAULTED_KEYS.get(model)
    if keys is None:
        found: set[str] = set()
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nullable = annotation is Any or annotation is None or (
                typing.get_origin(annotation) in (typing.Union, types.UnionType)
                and type(None) in typing.get_args(annotation))
            if field.is_required() or nullable:
                continue
            found.add(name)
            alias = field.validation_alias
            found.update(alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else [])
        keys = _DEFAULTED_KEYS[model] = frozenset(k for k in found if isinstance(k, str))
    return keys


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, reasoning_content, name... pass to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _check_tool_calls(self) -> ChatMessage:
        """An assistant turn's earlier calls, replayed in the history, in OpenAI's shape: a client that garbles
        them gets a 400 naming the shape (they are written into the prompt, and templates index into them)."""
        calls = (self.model_extra or {}).get("tool_calls")
        if calls is None:
            return self
        shape = '{"type": "function", "function": {"name": ..., "arguments": "<JSON>"}}'
        if not isinstance(calls, list):
            raise ValueError(f"tool_calls must be a list of {shape} objects")
        for i, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"tool_calls[{i}] must be an object {shape}")
            if not isinstance(function.get("arguments", "{}"), (str, dict)):
                raise ValueError(f"tool_calls[{i}].function.arguments must be a string of JSON")
        return self

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        content = self.content
        if isinstance(content, list):
            unsupported = sorted({p.type for p in content if p.type != "text"})
            if unsupported:
                raise InvalidRequestError(
                    f"Content parts of type {', '.join(unsupported)} are not supported by this model; "
                    "only 'text' is.",
                    param="messages",
                )
            # One line each, as vLLM and llama-server join them (the same request gets the same prompt there).
            message["content"] = "\n".join(p.text or "" for p in content)
        elif content is None:
            if self.role != "assistant":  # only an assistant turn (tool calls) may come without content
                raise InvalidRequestError(f"A {self.role} message must have content.", param="messages")
            message["content"] = ""
        if message["role"] == "developer":  # OpenAI's newer name for the system role
            message["role"] = "system"
        return message


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False  # OpenAI and vLLM refuse "yes" or 1 here; pydantic's lax bool would take them
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # llama-server's clients name it repeat_penalty, on its OpenAI routes too
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0,
                                      validation_alias=AliasChoices("repetition_penalty", "repeat_penalty"))
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (as a string) -> bias in [-100, 100]
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit() or int(token) < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for token {token}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and info.data.get("stream") is not True:
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
        return value

    def omitted_sampling(self) -> set[str]:
        """Sampling fields the request left to the model's defaults (deepserve.chat_options.apply_model_defaults)."""
        return {name for name in ("temperature", "top_p") if getattr(self, name) is None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, *, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            seed=None if self.seed == -1 else self.seed,  # -1: a random seed, as vLLM and llama-server read it
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            max_tokens=max_tokens,
            stop=stop,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
        )


class ReasoningOptions(_Lenient):
    """OpenRouter-style `reasoning: {effort, max_tokens, exclude}`, for clients that send it."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    max_tokens: int | None = Field(None, ge=0)
    exclude: bool = False


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Reasoning models: how the <think> block is returned (default: the model's, else deepseek) and its budget
    # (reasoning_effort low / medium / high = 1,024 / 4,096 / 16,384 tokens; max_reasoning_tokens wins).
    reasoning_format: Literal["deepseek", "raw", "hidden"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    max_reasoning_tokens: int | None = Field(None, ge=0)
    reasoning: ReasoningOptions | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Continue the last message, an assistant's, instead of starting a new turn: DeepSeek's chat prefix
    # completion ("prefix": true on that message) or vLLM's continue_final_message (with add_generation_prompt
    # false). add_generation_prompt false alone renders the chat with no assistant turn opened (vLLM).
    continue_final_message: StrictBool = False
    add_generation_prompt: StrictBool = True

    def chat_options(self) -> ChatOptions:
        extra = self.reasoning or ReasoningOptions()
        return ChatOptions(
            reasoning_format=self.reasoning_format or ("hidden" if extra.exclude else None),
            reasoning_effort=self.reasoning_effort or extra.effort,
            max_reasoning_tokens=self.max_reasoning_tokens if self.max_reasoning_tokens is not None else extra.max_tokens,
            response_format=self.response_format,
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            generation=self.generation(),
        )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        messages = [m.for_template() for m in self.messages]
        if self.continue_final_message:
            if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise InvalidRequestError("continue_final_message and add_generation_prompt cannot both be true.",
                                          param="continue_final_message")
            messages[-1]["prefix"] = True
        for message in messages:
            if not isinstance(message.get("prefix", False), bool):
                raise InvalidRequestError("A message's prefix must be true or false.", param="messages")
        if messages[-1].get("prefix") and messages[-1]["role"] != "assistant":
            raise InvalidRequestError("Only an assistant's message can be continued (prefix: true); the last "
                                      f"message is a {messages[-1]['role']}'s.", param="messages")
        return messages

    def generation(self) -> Generation:
        """How the prompt ends: an assistant turn opened (the default), the last message continued, or neither."""
        last = self.messages[-1]
        if self.continue_final_message or (last.model_extra or {}).get("prefix") is True:
            return Generation.CONTINUE
        return Generation.OPEN if self.add_generation_prompt else Generation.NONE

    def to_sampling(self, max_tokens: int) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        return self.sampling(max_tokens=max_tokens, logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for legacy completions
    echo: bool = False
    suffix: str | None = None  # fill-in-the-middle: the code after the gap (deepserve.fim)
    logprobs: int | None = Field(None, ge=0, le=20)

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("The prompt is empty.", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def to_sampling(self, max_tokens: int) -> SamplingParams:
        wants_logprobs = self.logprobs is not None
        params = self.sampling(max_tokens=max_tokens, logprobs=wants_logprobs, top_logprobs=self.logprobs or 0)
        if self.echo and wants_logprobs:  # the echoed prompt's tokens get logprobs too (OpenAI, vLLM)
            params = replace(params, prompt_logprobs=self.logprobs)
        return params
