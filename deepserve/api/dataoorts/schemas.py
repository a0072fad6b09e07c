"""Dataoorts serverless request body (seed 000): `{"model": ..., "data": {messages, sampling fields}}`.

`data` carries the Workers AI sampling fields with the same ranges (temperature 0–5, default 0.6; top_p 0–2;
top_k 1–50; seed 1–9999999999; penalties 0–2). Unknown fields are ignored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deepserve.api.workers_ai.schemas import Message, SamplingInput


class DataoortsData(SamplingInput):
    messages: list[Message] = Field(min_length=1)

    def template_messages(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


class DataoortsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="a served model id, e.g. the one GET /v1/models lists")
    data: DataoortsData
