"""What one upstream-served model needs: its upstreams, their keys, the model name they serve, timeouts and
routing knobs. Read from the models file (deepserve/models_file.py); validated strictly so a typo stops the
start with the field's name.

Upstream keys are `SecretStr`: they print as `**********` in any repr, error or log line.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpstreamSpec(_Strict):
    url: str = Field(description="the upstream's OpenAI base URL, e.g. http://10.0.0.5:8000/v1")
    api_key: SecretStr | None = Field(None, description="sent as `Authorization: Bearer`; never logged")
    api_key_env: str | None = Field(None, description="read the key from this environment variable instead")
    name: str | None = Field(None, description="how /health names it (default host:port)")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an upstream url must be http(s)://host[:port]/v1, got {value!r}")
        if parts.username or parts.password:
            raise ValueError("put an upstream's credentials in api_key / api_key_env, not in its url")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _resolve_key(self) -> UpstreamSpec:
        if self.api_key_env is not None:
            if self.api_key is not None:
                raise ValueError("give api_key or api_key_env, not both")
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(f"the environment variable {self.api_key_env} (api_key_env) is not set")
            self.api_key = SecretStr(value)
        if self.name is None:
            parts = urlsplit(self.url)
            self.name = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        return self

    @property
    def base_url(self) -> str:
        return self.url

    @property
    def health_url(self) -> str:
        """`/health` at the server's root (vLLM, SGLang, llama-server and deepserve all answer it there)."""
        parts = urlsplit(self.url)
        path = parts.path.removesuffix("/v1")
        return urlunsplit((parts.scheme, parts.netloc, path + "/health", "", ""))

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key.get_secret_value()}"} if self.api_key else {}


class Timeouts(_Strict):
    connect_s: float = Field(5.0, gt=0, description="to connect (and for a health probe)")
    read_s: float = Field(600.0, gt=0, description="longest wait for the next bytes: covers a long prompt's prefill")


class RemoteModelSpec(_Strict):
    id: str
    upstreams: list[UpstreamSpec] = Field(min_length=1)
    upstream_model: str | None = Field(None, description="the model name the upstreams serve (default: id)")
    context_window: int | None = Field(None, ge=16, description="default: the catalog's window for this id")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    health_interval_s: float = Field(10.0, ge=0, description="GET /health period (0: no active checks)")
    eject_after: int = Field(3, ge=1, description="consecutive failures that eject an upstream")
    eject_s: float = Field(30.0, ge=0, description="how long an ejected upstream gets no traffic")
    affinity_chars: int = Field(1024, ge=0, description="prompts at least this long route by this prefix (0: off)")
    affinity_max_excess: int = Field(4, ge=1, description="in-flight excess at which affinity yields to load")
    extra_body: dict | None = Field(None, description="fields added to every upstream request body")

    @model_validator(mode="after")
    def _unique_names(self) -> RemoteModelSpec:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError(f"two upstreams of {self.id} have one name ({', '.join(names)}): give them `name`s")
        return self
