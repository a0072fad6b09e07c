"""RemoteEngine: one model served by OpenAI-compatible upstream servers (vLLM, SGLang, llama-server, another
deepserve) over httpx, with the same interface as the in-process engine.

An upstream renders the chat template and tokenizes itself (a 671B model's tokenizer and template live with
its weights), so this engine takes `TextPrompt`s (`takes_text_prompts`): the chat's messages and tools, or a
raw prompt. Every request is streamed from the upstream with `stream_options.include_usage`; token counts
come from the upstream's `usage`, never from an estimate.

Failure semantics, per request:
- before any output: a refused connection, a timeout, a 5xx or 429, or a stream that breaks, fails over to
  the next available upstream (the router's choice among the rest); when none is left the first read raises
  (ServiceUnavailableError 503, or QueueFullError 429 if every upstream said busy), which `serving` turns
  into the dialect's error answer because it reads a remote stream once before the response starts
  (`starts_on_first_read`);
- an upstream 400/413/422 is the request's fault: InvalidRequestError with the upstream's message, no
  failover;
- after output has left: the stream ends with an error delta (the dialect's error event; never a silent
  truncation) carrying what was delivered, which is what billing charges;
- closing the stream (the client went away) closes the upstream connection, which makes the upstream abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from deepserve.engine.remote.config import RemoteModelSpec, UpstreamSpec
from deepserve.engine.remote.protocol import StreamTranslator, UpstreamProtocolError, is_chat, request_body
from deepserve.engine.remote.router import Router, UpstreamState
from deepserve.engine.types import GenerateRequest, TextPrompt, TokenDelta
from deepserve.errors import (
    DeepserveError, EngineError, InvalidRequestError, PayloadTooLargeError, QueueFullError, ServiceUnavailableError,
)
from deepserve.observability.metrics import set_upstream_health

log = logging.getLogger(__name__)

PER_MESSAGE_TOKENS = 16  # template tokens around one message (role markers): an allowance, for the bound only
PER_PROMPT_TOKENS = 64  # BOS, generation prompt, a template's fixed preamble


class _Retry(Exception):
    """This upstream failed before any output: try the next one."""

    def __init__(self, reason: str, *, busy: bool = False):
        super().__init__(reason)
        self.busy = busy


class RemoteEngine:
    takes_text_prompts = True  # serving builds TextPrompts for it: no local tokenizer or template
    starts_on_first_read = True  # its first read connects; failures there are raised, not streamed

    def __init__(self, spec: RemoteModelSpec, *, transport: httpx.AsyncBaseTransport | None = None):
        self.spec = spec
        self.model_id = spec.id
        self.ctx_size = spec.context_window
        self.router = Router(
            [u.name for u in spec.upstreams], eject_after=spec.eject_after, eject_s=spec.eject_s,
            affinity_chars=spec.affinity_chars, affinity_max_excess=spec.affinity_max_excess,
        )
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None
        self._closed = False
        self.num_failovers = 0  # tries that failed before any output (the request moved on, or found none left)
        self.num_broken_streams = 0  # streams that failed after output had left

    # ---- life cycle ---------------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made on the serving loop, on first use
            t = self.spec.timeouts
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(connect=t.connect_s, read=t.read_s, write=t.connect_s, pool=t.connect_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self._client

    def start(self) -> None:
        """Start the active health checks (call on the serving event loop)."""
        if self.spec.health_interval_s > 0 and self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            try:
                await asyncio.gather(*(self.probe(u) for u in self.router.upstreams))
            except Exception:  # a probe must never end the checks
                log.exception("health probes of %s failed", self.model_id)
            await asyncio.sleep(self.spec.health_interval_s)

    async def probe(self, state: UpstreamState) -> bool:
        upstream = self.spec.upstreams[state.index]
        try:
            response = await self._http().get(upstream.health_url, headers=upstream.headers(),
                                              timeout=self.spec.timeouts.connect_s)
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok != state.healthy:
            log.warning("upstream %s of %s is %s", state.name, self.model_id, "healthy again" if ok else "unhealthy")
        self.router.record_health(state, ok)
        self._export_health(state)
        return ok

    def _export_health(self, state: UpstreamState) -> None:
        """deepserve_upstream_up{model, upstream}: 1 while the router would send it requests."""
        set_upstream_health(self.model_id, self.spec.upstreams[state.index].url, state.available(self.router.now()))

    @property
    def is_ready(self) -> bool:
        # Not "some upstream is healthy": every replica of this server sees the same upstreams, so taking one
        # out of its load balancer would not help, and its other models still serve. /health shows upstreams.
        return not self._closed

    def close(self) -> None:
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RuntimeError):  # no loop left: the process is ending anyway
                asyncio.get_running_loop().create_task(client.aclose())

    def stats(self) -> dict:
        return {
            "model": self.model_id, "engine": "upstream", "ctx_size": self.ctx_size,
            "num_running": sum(u.outstanding for u in self.router.upstreams),
            "num_failovers": self.num_failovers, "num_broken_streams": self.num_broken_streams,
            "upstreams": self.router.snapshot(),
        }

    # ---- prompts ------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raise EngineError(f"{self.model_id} is served by an upstream engine: this server has no tokenizer for it.")

    def chat_prompt(self, messages: list[dict[str, Any]], *, tools: list[dict] | None = None,
                    tool_choice: Any = None, parallel_tool_calls: bool | None = None) -> TextPrompt:
        # An upper bound of its tokens: each token of a byte-level BPE vocabulary is at least one byte.
        size = sum(len(_text_of(m).encode()) + PER_MESSAGE_TOKENS for m in messages) + PER_PROMPT_TOKENS
        if tools:
            size += len(str(tools).encode())
        return TextPrompt(messages=messages, tools=tools, tool_choice=tool_choice,
                          parallel_tool_calls=parallel_tool_calls, num_tokens_bound=size)

    def text_prompt(self, text: str) -> TextPrompt:
        return TextPrompt(text=text, num_tokens_bound=len(text.encode()) + 2)  # + BOS (and a leading space)

    # ---- requests -----------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if self._closed:
            raise ServiceUnavailableError("The engine is shutting down.")
        return self._generate(request)

    def abort(self, request_id: str) -> None:
        """Nothing to do: a stream that was never read holds no connection, and closing a stream that was
        read closes its upstream connection."""

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        prompt = request.prompt_tokens
        path = "/chat/completions" if is_chat(prompt) else "/completions"
        body = request_body(request, self.spec.upstream_model or self.model_id, self.spec.extra_body)
        key = self.router.affinity_key(_affinity_text(prompt))
        tried: list[UpstreamState] = []
        reasons: list[str] = []
        all_busy = True
        started = False
        translator = StreamTranslator(request)
        while True:
            state = self.router.pick(key, exclude=tried)
            if state is None:
                break
            tried.append(state)
            translator = StreamTranslator(request)  # a fresh count per try: only a try with output is charged
            self.router.started(state)
            events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=64)
            reader = _spawn(self._read(self.spec.upstreams[state.index], path, body, events))
            completed = False
            try:
                status, detail = await _next(events)
                if status != 200:
                    _refused(status, detail)  # raises: _Retry, or the request's own error
                if not started:  # the upstream took the request: the route may start its response
                    started = True
                    yield TokenDelta()
                while True:
                    payload = await _next(events)
                    if payload == "[DONE]":
                        completed = True  # the reader finishes the body itself, so its connection is reused
                        final = translator.done()
                        self.router.succeeded(state)
                        self._export_health(state)
                        yield final
                        return
                    delta = translator.feed(payload)
                    if delta is not None:
                        yield delta
            except DeepserveError as exc:  # the request's own fault (an upstream 400): no failover
                if not started:
                    raise
                yield translator.failed(exc.message)
                return
            except (httpx.HTTPError, UpstreamProtocolError, _Retry) as exc:
                busy = isinstance(exc, _Retry) and exc.busy
                all_busy = all_busy and busy
                if not busy:
                    self.router.failed(state)
                    self._export_health(state)
                reason = _describe(exc)
                if translator.delivered_output:  # too late to fail over: end with an error, never truncate
                    self.num_broken_streams += 1
                    log.warning("upstream %s broke a stream of %s after %d tokens: %s", state.name, self.model_id,
                                translator.num_delivered, reason)
                    yield translator.failed(f"the upstream failed mid-stream ({reason})")
                    return
                self.num_failovers += 1
                reasons.append(f"upstream #{state.index + 1}: {reason}")  # its address stays in the log
                log.warning("upstream %s failed a request of %s before its first token (%s); trying another",
                            state.name, self.model_id, reason)
            finally:
                if not completed:
                    reader.cancel()  # closes the upstream connection when it is still open: the upstream aborts
                self.router.ended(state)
        message = (f"No upstream of {self.model_id} could take the request "
                   f"({len(tried)} tried of {len(self.router.upstreams)}"
                   + (f"; {'; '.join(reasons)}" if reasons else "; none is healthy") + ").")
        if started:  # the response may have begun: end it with an error, as after output
            yield translator.failed(message)
            return
        if tried and all_busy:
            raise QueueFullError(message)
        raise ServiceUnavailableError(message)

    async def _read(self, upstream: UpstreamSpec, path: str, body: dict[str, Any],
                    events: asyncio.Queue[tuple[str, Any]]) -> None:
        """One upstream request, in a task of its own: ("status", (code, error body)), then ("data", payload)
        per SSE event, then ("end", None); ("error", exc) on a transport failure.

        Why a task of its own: when the client goes away the server cancels the request's task through an
        anyio cancel scope, which re-delivers the cancellation at every await; httpx's own close of the
        connection is then cut short and the connection stays open, so the upstream would keep generating
        for nobody. This task is outside that scope: the request's `finally` cancels it once, and the close
        (the `async with` exit) completes, so the upstream sees the connection drop and aborts."""
        try:
            async with self._http().stream("POST", upstream.base_url + path, json=body,
                                           headers=upstream.headers()) as response:
                if response.status_code != 200:
                    await events.put(("status", (response.status_code, await response.aread())))
                    return
                await events.put(("status", (200, b"")))
                payloads = _sse_payloads(response)
                async for payload in payloads:
                    await events.put(("data", payload))
                    if payload == "[DONE]":
                        # Read the body to its end (the chunked terminator follows [DONE] at once): httpx
                        # returns a fully read connection to its pool, whereas leaving here would close it
                        # and make the next request pay a new TCP connection (measured: ~5 ms of TTFT).
                        with contextlib.suppress(TimeoutError, httpx.HTTPError):
                            async with asyncio.timeout(self.spec.timeouts.connect_s):
                                async for _ in payloads:
                                    pass
                        return
            await events.put(("end", None))
        except httpx.HTTPError as exc:
            await events.put(("error", exc))


_tasks: set[asyncio.Task] = set()  # upstream readers alive (the loop keeps only weak references)


def _spawn(coroutine: Any) -> asyncio.Task:
    task = asyncio.get_running_loop().create_task(coroutine)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


async def _next(events: asyncio.Queue[tuple[str, Any]]) -> Any:
    kind, value = await events.get()
    if kind == "error":
        raise value
    if kind == "end":
        raise UpstreamProtocolError("the upstream closed its stream before [DONE]")
    return value


def _refused(status: int, raw: bytes) -> None:
    detail = _error_message(raw)
    if status in (400, 422):
        raise InvalidRequestError(f"The upstream engine refused the request: {detail}")
    if status == 413:
        raise PayloadTooLargeError(f"The upstream engine refused the request: {detail}")
    raise _Retry(f"HTTP {status}", busy=status == 429)


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    text = content if isinstance(content, str) else str(content or "")
    if message.get("tool_calls"):
        text += str(message["tool_calls"])
    return text + str(message.get("role", ""))


def _affinity_text(prompt: TextPrompt | list[int]) -> str:
    """The prompt as one string whose prefixes match when the prompts' prefixes match."""
    if isinstance(prompt, TextPrompt):
        if prompt.messages is None:
            return prompt.text or ""
        return "".join(f"\x00{m.get('role', '')}\x00{_text_of(m)}" for m in prompt.messages)
    return ",".join(map(str, prompt))


async def _sse_payloads(response: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of an SSE body (comments and other fields skipped)."""
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


def _error_message(raw: bytes) -> str:
    import json

    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:300].decode(errors="replace") or "no details"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:1000]
    if isinstance(error, str):
        return error[:1000]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:1000]
    return raw[:300].decode(errors="replace")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__  # never the URL: it may carry credentials
    return str(exc)
