"""Workers AI request bodies (seed 001), and the sampling fields Dataoorts' `data` object shares with them.

Ranges are the providers' published ones (temperature 0–5, top_p 0–2, top_k 1–50, seed 1–9999999999,
penalties 0–2); a value outside gets a 400 that names the field and its range. Unknown fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from deepserve.chat_options import ChatOptions, configure_sampling
from deepserve.engine.types import SamplingParams
from deepserve.serving import ServedModel

MAX_TEXT_CHARS = 4096  # prompt and each message's content (the seed's maxLength)
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.6


def bounded(kind: type, low: float, high: float) -> Any:
    """`kind` limited to [low, high]: the error names the range, and the OpenAPI schema shows it."""

    def check(value: float) -> float:
        if not low <= value <= high:
            context = {"low": low, "high": high, "value": value}
            raise PydanticCustomError("out_of_range", "must be between {low} and {high}, got {value}", context)
        return value

    return Annotated[kind, AfterValidator(check), Field(json_schema_extra={"minimum": low, "maximum": high})]


Temperature = bounded(float, 0, 5)
TopP = bounded(float, 0, 2)
TopK = bounded(int, 1, 50)
Seed = bounded(int, 1, 9_999_999_999)
Penalty = bounded(float, 0, 2)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str = Field(max_length=MAX_TEXT_CHARS)


class SamplingInput(BaseModel):
    """The sampling fields of Workers AI's text-generation input (Dataoorts passes the same ones)."""

    model_config = ConfigDict(extra="ignore")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: Temperature = DEFAULT_TEMPERATURE
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    repetition_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    # deepserve's extensions, as on the OpenAI route: reasoning style and budget, and JSON mode
    # (Cloudflare's `response_format: {"type": "json_schema", "json_schema": <schema>}`, or OpenAI's shape).
    reasoning_format: Literal["deepseek", "raw", "hidden"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    max_reasoning_tokens: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None

    def to_sampling(self, model: ServedModel | None = None, num_prompt_tokens: int = 0) -> SamplingParams:
        """The engine parameters; with the model, also its defaults (temperature, top_p, max_tokens: where the
        request gave none), its reasoning handling and the response format (deepserve.chat_options)."""
        sampling = self._sampling()
        if model is None:
            return sampling
        options = ChatOptions(reasoning_format=self.reasoning_format, reasoning_effort=self.reasoning_effort,
                              max_reasoning_tokens=self.max_reasoning_tokens, response_format=self.response_format)
        omitted = {name for name in ("temperature", "top_p", "max_tokens") if name not in self.model_fields_set}
        sampling.max_tokens_fits_balance = "max_tokens" in omitted  # the dialect's default, not the client's
        sampling = configure_sampling(model, sampling, options, omitted=omitted, num_prompt_tokens=num_prompt_tokens)
        if "max_tokens" in omitted and num_prompt_tokens and not model.takes_text_prompts:
            # The dialect's default is not the client's: it shrinks to what the window has room for rather than
            # refuse a prompt that fits (an upstream's count is only a bound: it caps the default itself).
            sampling.max_tokens = min(sampling.max_tokens, model.resolve_max_tokens(None, num_prompt_tokens))
        return sampling

    def _sampling(self) -> SamplingParams:
        # The engine reads top_p as a probability mass, so the providers' 1–2 means "no cut-off".
        # A repetition_penalty of 0 would divide llama.cpp's logits by zero: 0 (like 1) means no penalty.
        return SamplingParams(
            temperature=self.temperature,
            top_p=1.0 if self.top_p is None else min(self.top_p, 1.0),
            top_k=self.top_k or 0,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            max_tokens=self.max_tokens,
        )


class RunRequest(SamplingInput):
    """`{prompt, raw}` or `{messages}` (exactly one), plus `stream` and the sampling fields."""

    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    raw: bool = Field(False, description="true: the prompt goes to the model as is, with no chat template")
    messages: list[Message] | None = Field(None, min_length=1)
    stream: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> RunRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt_or_messages", "give exactly one of `prompt` and `messages`")
        return self

    def prompt_tokens(self, model: ServedModel) -> list[int]:
        if self.messages is not None:
            return model.chat_prompt_tokens([m.model_dump() for m in self.messages])
        if self.raw:
            return model.text_prompt_tokens(self.prompt or "")
        return model.chat_prompt_tokens([{"role": "user", "content": self.prompt or ""}])
