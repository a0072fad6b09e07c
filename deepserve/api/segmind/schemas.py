"""Segmind request body (seed 002): `{"messages": [...]}` plus optional max_tokens, temperature, top_p, stream.

The ranges are OpenAI's (the answer is an OpenAI chat completion): temperature 0–2, top_p in (0, 1].
Unknown fields are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deepserve.api.openai.schemas import ChatCompletionRequest


class SegmindMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant", "system"]
    content: str


class SegmindChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[SegmindMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the model's default, else the rest of the context")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    # deepserve's extensions, as on the OpenAI route (reasoning style and budget, JSON output)
    reasoning_format: Literal["deepseek", "raw", "hidden"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    max_reasoning_tokens: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None

    def to_openai(self, model: str) -> ChatCompletionRequest:
        """The same request as an OpenAI chat completion (its bounds are the same, so this cannot fail)."""
        fields = self.model_dump(exclude_none=True)
        return ChatCompletionRequest.model_validate({**fields, "model": model})
