"""Dataoorts serverless request body (seed 000): `{"model": ..., "data": {messages, sampling fields}}`.

`data` carries the Workers AI sampling fields with the same ranges (temperature 0–5, default 0.6; top_p 0–2;
top_k 1–50; seed 1–9999999999; penalties 0–2). Unknown fields are ignored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deepserve.api.workers_ai.schemas import SamplingInput


class DataoortsMessage(BaseModel):
    """Workers AI's message, without its 4,096-character cap on `content` (Cloudflare's schema has one; seed 000
    names only the model's context window, which the engine checks in tokens)."""

    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class DataoortsData(SamplingInput):
    messages: list[DataoortsMessage] = Field(min_length=1)

    def template_messages(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


class DataoortsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="a served model id, e.g. the one GET /v1/models lists")
    data: DataoortsData
