"""Settings: the only place that reads the environment (prefix DEEPSERVE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model_path: str | None = Field(None, description="GGUF file; default: the bundled SmolLM2-135M-Instruct")
    model_id: str | None = Field(None, description="name clients use; default: derived from the file")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="catalog or registered ids to serve (default: every registered model)"
    )
    template: str | None = Field(None, description="built-in chat template for every model served")
    config: Path | None = Field(
        None, description="models file (YAML): serve exactly the local and upstream-served models it lists"
    )
    data_dir: Path = Field(
        Path("~/.local/share/deepserve"), validate_default=True, description="local model registry and pulled weights"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads per model (default: cores split between models)")
    ctx_size: int = Field(2048, ge=64, description="context window of one request (prompt + max_tokens)")
    parallel: int = Field(8, ge=1, le=256, description="sequences decoded together (slots)")
    batch_size: int = Field(512, ge=8, description="tokens per llama_decode (n_batch): caps prefill chunks")
    # As llama-server and vLLM, which queue every request, a load test's whole first wave (hundreds started at
    # once) is answered; bounded all the same, so a flood gets 429 instead of unbounded memory and waits.
    max_queue: int = Field(1024, ge=0, description="requests allowed to wait for a slot; more get 429")
    kv_unified: bool = False
    cache_ram_mib: int | None = Field(
        None, ge=0, description="host-memory prompt cache per model, MiB (llama-server's --cache-ram; 0: off; "
        "default 8192, at most a quarter of the machine's memory shared by the local models)"
    )
    pin_threads: bool = Field(True, description="pin each engine's llama.cpp threads to CPUs of their own")
    poll: int = Field(0, ge=0, le=100, description="ggml worker polling level between steps (0: sleep, 100: spin); "
                      "only for a llama.cpp built without OpenMP (the default build uses OpenMP)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    no_auth: bool = False
    database_url: str | None = Field(
        None, description="billing database (SQLAlchemy URL); default: SQLite file deepserve.db in data_dir"
    )
    admin_key: str | None = Field(None, description="key for the /admin/ API (no key: the admin API is off)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Browsers' cross-origin calls (a chat UI on another port): allowed from anywhere by default, as llama-server
    # and vLLM (--allowed-origins) do; keys travel in headers, never cookies. Empty: no CORS headers at all.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    sse_keepalive_s: float = Field(10.0, gt=0, description="idle seconds before a `: keep-alive` SSE comment or a late JSON answer's blank line")
    # operating it (deepserve.observability, deepserve.shutdown)
    log_format: Literal["text", "json"] = Field("text", description="log lines as text or one JSON object each")
    log_prompts: bool = Field(False, description="put each request's prompt in its log line (off: never)")
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM/SIGINT, seconds running requests get to finish before cancellation"
    )
    metrics_key: str | None = Field(
        None, description="bearer token /metrics requires (none: open, as vLLM and NIM serve it)"
    )

    @field_validator("api_keys", "models", "allowed_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # DEEPSERVE_API_KEYS=key1,key2 / DEEPSERVE_MODELS=id1,id2 (comma-separated lists, not JSON)
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        """`database_url`, else a SQLite file in `data_dir` (created on first use)."""
        return self.database_url or f"sqlite:///{self.data_dir / 'deepserve.db'}"

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()
