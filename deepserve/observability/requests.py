"""One HTTP request as the operator sees it: the record the middleware opens and the serving hook fills.

`RequestObserver` (ASGI, outermost) opens a `RequestRecord` per request, puts it in the request's state,
and when the response is complete records the request metrics and writes one log line. The serving hook
`observe_streams()` (called once, by `deepserve.serving.metered_generate_many`) wraps the generation streams:
it names the model, times the first token and the gaps between tokens, and counts tokens the way usage
counts them (a prompt once for its n choices; what was computed when a stream ends early).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepserve.engine.types import StreamTap, TokenCounts, TokenDelta, count_choices
from deepserve.observability import metrics

request_log = logging.getLogger("deepserve.requests")

STATE_KEY = "observation"
# Probes and scrapes: not counted as requests, not logged (they would drown the real traffic).
QUIET_PATHS = frozenset({"/metrics", "/v1/metrics", "/health", "/v1/health", "/v1/health/live", "/v1/health/ready"})
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PROMPT_LOG_LIMIT = 64 * 1024  # characters of prompt a log line may carry when prompt logging is on
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


def dialect_of(path: str) -> str:
    """Which API a path belongs to (a bounded label)."""
    from deepserve.api.segmind.routes import is_slug_path

    if path.startswith("/client/v4/"):
        return "workers_ai"
    if path == "/api/v1":
        return "dataoorts"
    if path in ("/completion", "/infill", "/props", "/apply-template"):
        return "llamacpp"
    if is_slug_path(path):
        return "segmind"
    if path.startswith("/admin/") or path == "/admin":
        return "admin"
    if path in ("/docs", "/redoc", "/openapi.json") or path.startswith("/docs/"):
        return "other"
    return "openai"


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    dialect: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None  # set once the request reaches generation
    status: int | None = None
    first_token_at: float | None = None
    tokens: TokenCounts = field(default_factory=TokenCounts)  # as usage counts them, over the request's prompts
    finish_reasons: list[str] = field(default_factory=list)
    prompt: Any = None  # only when prompt logging is on

    def elapsed(self, now: float | None = None) -> float:
        return (now if now is not None else time.perf_counter()) - self.started


def record_of(request: Any) -> RequestRecord | None:
    state = getattr(request, "scope", {}).get("state")
    return state.get(STATE_KEY) if isinstance(state, dict) else None


class _Choice:
    __slots__ = ("last_token_at", "num_delivered", "final")

    def __init__(self) -> None:
        self.last_token_at: float | None = None
        self.num_delivered = 0
        self.final: TokenDelta | None = None


class ObservedStream(StreamTap):
    """A generation stream (n choices of one prompt) that reports timing and tokens to the request's record."""

    __slots__ = ("_record", "_num_prompt", "_choices", "_itl", "_direct")

    def __init__(self, inner: AsyncIterator[tuple[int, TokenDelta]], record: RequestRecord, num_prompt: int, n: int):
        super().__init__(inner)
        self._record = record
        self._num_prompt = num_prompt
        self._choices = [_Choice() for _ in range(n)]
        self._itl = metrics.INTER_TOKEN_LATENCY.labels(record.model, record.dialect)  # looked up once, used per token
        self._direct: Any = None  # api/direct.py's writer of the one choice's plain text, if it has one

    def _direct_attached(self, sink: Any) -> None:
        sink.itl = self._itl  # it observes the gaps between the tokens it writes
        self._direct = sink

    def _last_token_at(self, choice: _Choice) -> float | None:
        direct = self._direct
        return choice.last_token_at if direct is None else direct.last_token_at

    def _note_direct_first_token(self) -> None:
        """Time to first token when the first token went out directly (api/direct.py)."""
        record, direct = self._record, self._direct
        if direct is not None and direct.first_token_at is not None and record.first_token_at is None:
            record.first_token_at = direct.first_token_at
            metrics.TIME_TO_FIRST_TOKEN.labels(record.model, record.dialect).observe(record.elapsed(direct.first_token_at))

    async def _seen(self, index: int, delta: TokenDelta) -> None:
        record = self._record
        choice = self._choices[index]
        num_tokens = delta.num_tokens  # an upstream engine streams text: its deltas count without ids
        if self._direct is not None:
            self._note_direct_first_token()
        if num_tokens:
            now = time.perf_counter()
            if record.first_token_at is None:
                record.first_token_at = now
                metrics.TIME_TO_FIRST_TOKEN.labels(record.model, record.dialect).observe(record.elapsed(now))
            elif (last := self._last_token_at(choice)) is not None:  # a choice's first token is no inter-token gap
                gap = (now - last) / num_tokens  # a delta may carry several tokens (remote)
                for _ in range(num_tokens):
                    self._itl.observe(gap)
            choice.last_token_at = now
            if self._direct is not None:  # the next direct token's gap is from this one (never both at once)
                self._direct.last_token_at = now
            choice.num_delivered += num_tokens
        if delta.finish_reason is not None:
            choice.final = delta

    async def _closed_hook(self) -> None:
        """Tokens as usage counts them: the engine's final counts, else the prompt and what was delivered."""
        record = self._record
        labels = (record.model, record.dialect)
        if self._direct is not None:
            self._note_direct_first_token()
            self._choices[0].num_delivered += self._direct.num_tokens
        counts = count_choices(self._num_prompt, self._choices)
        record.tokens.add(counts)
        metrics.PROMPT_TOKENS.labels(*labels).inc(counts.num_prompt)
        metrics.CACHED_PROMPT_TOKENS.labels(*labels).inc(counts.num_cached)
        metrics.GENERATION_TOKENS.labels(*labels).inc(counts.num_completion)
        metrics.REASONING_TOKENS.labels(*labels).inc(counts.num_reasoning)
        for choice in self._choices:
            reason = choice.final.finish_reason.value if choice.final and choice.final.finish_reason else "abort"
            record.finish_reasons.append(reason)
            metrics.CHOICES_FINISHED.labels(*labels, reason).inc()


def observe_streams(request: Any, model_id: str, prompts: list[list[int]], n: int,
                    streams: list[AsyncIterator[tuple[int, TokenDelta]]]) -> list[AsyncIterator[tuple[int, TokenDelta]]]:
    """The serving hook: wrap a request's generation streams (one per prompt) so they report to its record.
    Without a record (the app runs without the observer) the streams pass through unchanged."""
    record = record_of(request)
    if record is None:
        return streams
    record.model = model_id
    return [ObservedStream(stream, record, len(tokens), n) for stream, tokens in zip(streams, prompts)]


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id when it is a plain token, else a fresh one (it is echoed in the response)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(text):
                return text
    return "req_" + secrets.token_hex(12)


def _prompt_of(body: bytes) -> Any:
    """The prompt fields of a request body (every dialect's): messages, prompt, Dataoorts' data.messages."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    data = parsed.get("data") if isinstance(parsed.get("data"), dict) else {}
    prompt = {k: v for k, v in (("messages", parsed.get("messages") or data.get("messages")),
                                ("prompt", parsed.get("prompt"))) if v is not None}
    if not prompt:
        return None
    text = json.dumps(prompt, ensure_ascii=False)
    return prompt if len(text) <= PROMPT_LOG_LIMIT else {"truncated": text[:PROMPT_LOG_LIMIT]}


class RequestObserver:
    """Outermost ASGI middleware: request id, in-flight gauge, request metrics, one log line per request."""

    def __init__(self, app: ASGIApp, *, log_prompts: bool = False):
        self.app = app
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        record = RequestRecord(_request_id(scope), scope["method"], scope["path"], dialect_of(scope["path"]))
        scope.setdefault("state", {})[STATE_KEY] = record
        body = bytearray()

        async def observed_receive() -> Message:
            message = await receive()
            if self.log_prompts and message["type"] == "http.request" and len(body) <= 4 * PROMPT_LOG_LIMIT:
                body.extend(message.get("body", b""))
            return message

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", record.request_id.encode())]}
            await send(message)

        metrics.IN_FLIGHT.inc()
        failed = False
        try:
            await self.app(scope, observed_receive if self.log_prompts else receive, observed_send)
        except BaseException:
            failed = True
            raise
        finally:
            metrics.IN_FLIGHT.dec()
            if self.log_prompts and body:
                record.prompt = _prompt_of(bytes(body))
            finish(record, scope, failed=failed)


def finish(record: RequestRecord, scope: Scope, *, failed: bool = False) -> None:
    """The request is over: request metrics and its log line."""
    duration = record.elapsed()
    status = record.status or (500 if failed else CLIENT_CLOSED)
    model = record.model or ""
    metrics.REQUESTS.labels(model, record.dialect, str(status)).inc()
    if record.model is not None:
        metrics.REQUEST_DURATION.labels(model, record.dialect).observe(duration)
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path,  # scope["path"] has no query string: nothing a client put there is logged
        "dialect": record.dialect,
        "model": record.model,
        "status": status,
        "latency_ms": round(duration * 1000, 1),
    }
    if record.model is not None:
        fields.update(
            ttft_ms=round((record.first_token_at - record.started) * 1000, 1) if record.first_token_at else None,
            prompt_tokens=record.tokens.num_prompt, cached_tokens=record.tokens.num_cached,
            completion_tokens=record.tokens.num_completion, reasoning_tokens=record.tokens.num_reasoning,
            finish_reason=_finish_reason(record.finish_reasons),
        )
    principal = scope.get("state", {}).get("principal")
    if principal is not None and getattr(principal, "key_id", None) is not None:
        fields.update(key_id=principal.key_id, account_id=principal.account_id)  # database ids, never the key
    if record.prompt is not None:
        fields["prompt"] = record.prompt
    request_log.info("request", extra={"fields": fields})


def _finish_reason(reasons: list[str]) -> str | None:
    """One reason for the log line: the only one, or the choices' reasons joined (n > 1, in choice order)."""
    if not reasons:
        return None
    unique = list(dict.fromkeys(reasons))
    return unique[0] if len(unique) == 1 else ",".join(reasons)
