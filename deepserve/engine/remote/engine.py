"""RemoteEngine: one model served by OpenAI-compatible upstream servers (vLLM, SGLang, llama-server, another
deepserve) over aiohttp, with the same interface as the in-process engine.

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

The upstream client is aiohttp (one `ClientSession` per engine, pooled keep-alive connections), not httpx:
its HTTP parser is C, where httpx's stack (httpcore, h11, anyio) is Python, and the gateway hop's budget is a
few milliseconds of time-to-first-token. Measured on the 2-core VM against a trivial local upstream, one
streamed request costs ~0.8 ms with aiohttp and ~2.4 ms with httpx, both reusing their connection. Proxy
environment variables and ~/.netrc are not read (aiohttp's `trust_env` would cost two thread-pool hops per
request); TLS upstreams are verified against SSL_CERT_FILE / SSL_CERT_DIR or else certifi's bundle, as httpx
did; redirects are not followed and no cookies are kept, as with httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from deepserve.engine.remote.config import RemoteModelSpec, UpstreamSpec
from deepserve.engine.remote.protocol import StreamTranslator, UpstreamProtocolError, is_chat, request_body
from deepserve.engine.remote.router import Router, UpstreamState
from deepserve.engine.types import GenerateRequest, Generation, TextPrompt, TokenDelta
from deepserve.errors import (
    ContextLengthError, DeepserveError, EngineError, InvalidRequestError, PayloadTooLargeError, QueueFullError,
    ServiceUnavailableError,
)
from deepserve.observability.metrics import set_upstream_health

log = logging.getLogger(__name__)

PER_MESSAGE_TOKENS = 16  # template tokens around one message (role markers): an allowance, for the bound only
PER_PROMPT_TOKENS = 64  # BOS, generation prompt, a template's fixed preamble
MAX_SSE_LINE = 16 << 20  # bytes in one SSE line (aiohttp's own default, 128 KiB, is short of a large tool call)
# Shorter than the keep-alive of uvicorn (vLLM, SGLang, deepserve) and llama-server, 5 s: a pooled connection
# is dropped here before its upstream closes it, never written to while the upstream's FIN is on its way.
KEEPALIVE_S = 4.0
# What a failed upstream connection raises (ServerTimeoutError and asyncio's timeouts are TimeoutErrors).
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError)


class _Retry(Exception):
    """This upstream failed before any output: try the next one."""

    def __init__(self, reason: str, *, busy: bool = False):
        super().__init__(reason)
        self.busy = busy


class RemoteEngine:
    takes_text_prompts = True  # serving builds TextPrompts for it: no local tokenizer or template
    starts_on_first_read = True  # its first read connects; failures there are raised, not streamed

    def __init__(self, spec: RemoteModelSpec):
        self.spec = spec
        self.model_id = spec.id
        self.ctx_size = spec.context_window
        self.router = Router(
            [u.name for u in spec.upstreams], eject_after=spec.eject_after, eject_s=spec.eject_s,
            affinity_chars=spec.affinity_chars, affinity_max_excess=spec.affinity_max_excess,
        )
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None
        self._closed = False
        self.num_failovers = 0  # tries that failed before any output (the request moved on, or found none left)
        # Tokens the upstream's template adds to a chat beyond the per-message allowance, learned from what it
        # reports: a template with a long preamble (tool instructions, a default system prompt) made the
        # reservation, and so the charge, fall short of the real prompt.
        self.prompt_allowance = PER_PROMPT_TOKENS
        self.num_broken_streams = 0  # streams that failed after output had left

    # ---- life cycle ---------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the serving loop, on first use
            t = self.spec.timeouts
            tls = any(u.url.startswith("https:") for u in self.spec.upstreams)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S,
                                               ssl=_tls_context() if tls else True),
                # sock_read: the longest wait for the next bytes (a long prompt's prefill), not a total
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.read_s),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

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
            async with self._http().get(upstream.health_url, headers=upstream.headers(), allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=self.spec.timeouts.connect_s)) as response:
                await response.read()  # to its end: the connection goes back to the pool
                ok = response.status == 200
        except TRANSPORT_ERRORS:
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
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(RuntimeError):  # no loop left: the process is ending anyway
                self._closing = asyncio.get_running_loop().create_task(session.close())

    async def aclose(self) -> None:
        """close(), then wait until the upstream connections are closed."""
        self.close()
        if self._closing is not None:
            await self._closing

    def stats(self) -> dict:
        return {
            "model": self.model_id, "engine": "upstream", "ctx_size": self.ctx_size,
            "num_running": sum(u.outstanding for u in self.router.upstreams),
            "num_failovers": self.num_failovers, "num_broken_streams": self.num_broken_streams,
            "upstreams": self.router.snapshot(),
        }

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Only what is certain here: max_tokens alone past the context window can never fit (the prompt's count
        is a bound, and the upstream checks the sum itself). Such a request also reserved max_tokens' worst case
        and could get a 402 it never needed."""
        if max_tokens > self.ctx_size:
            raise ContextLengthError(
                f"This model's maximum context length is {self.ctx_size} tokens. However, you requested "
                f"{max_tokens} tokens for the completion alone. Please reduce max_tokens.", param="max_tokens")

    # ---- prompts ------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raise EngineError(f"{self.model_id} is served by an upstream engine: this server has no tokenizer for it.")

    def chat_prompt(self, messages: list[dict[str, Any]], *, tools: list[dict] | None = None,
                    tool_choice: Any = None, parallel_tool_calls: bool | None = None,
                    generation: Generation = Generation.OPEN) -> TextPrompt:
        # An upper bound of its tokens: each token of a byte-level BPE vocabulary is at least one byte.
        size = sum(len(_text_of(m).encode()) + PER_MESSAGE_TOKENS for m in messages) + self.prompt_allowance
        if tools:
            size += len(str(tools).encode())
        return TextPrompt(messages=messages, tools=tools, tool_choice=tool_choice,
                          parallel_tool_calls=parallel_tool_calls, generation=generation, num_tokens_bound=size)

    def _learn_prompt_size(self, prompt: Any, num_reported: int) -> None:
        """A chat prompt the upstream counted beyond its bound: later chats' bounds carry the difference."""
        if isinstance(prompt, TextPrompt) and prompt.messages is not None and num_reported > len(prompt):
            self.prompt_allowance += num_reported - len(prompt)
            log.warning("%s: the upstream counted %d prompt tokens, %d more than the bound reserved for; later "
                        "chat prompts reserve %d tokens for its template", self.model_id, num_reported,
                        num_reported - len(prompt), self.prompt_allowance)

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
        try:  # once for every try; compact UTF-8, as httpx's json= sent it
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:  # NaN or infinity: no upstream can parse it
            raise InvalidRequestError(f"The request cannot be sent to the upstream engine: {exc}.") from None
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
            reader = _spawn(self._read(self.spec.upstreams[state.index], path, data, events))
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
                        self._learn_prompt_size(prompt, final.num_prompt_tokens)
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
            except (*TRANSPORT_ERRORS, UpstreamProtocolError, _Retry) as exc:
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
        unavailable = ServiceUnavailableError(message)
        # When to try again: the next health probe may find an upstream back (clients and SDKs honour it).
        unavailable.headers["Retry-After"] = str(max(1, math.ceil(self.spec.health_interval_s or 1)))
        raise unavailable

    async def _read(self, upstream: UpstreamSpec, path: str, data: bytes,
                    events: asyncio.Queue[tuple[str, Any]]) -> None:
        """One upstream request, in a task of its own: ("status", (code, error body)), then ("data", payload)
        per SSE event, then ("end", None); ("error", exc) on a transport failure.

        Why a task of its own: after [DONE] it reads the body to its end while the request's stream has
        already returned (see below), and a cancellation reaches it once. When the client goes away the server
        cancels the request's task through an anyio cancel scope, which re-delivers the cancellation at every
        await, so a close awaited in that task can be cut short and leave the connection open, the upstream
        generating for nobody. Here the request's `finally` cancels this task once, and leaving the `async
        with` releases the unfinished response, which closes its connection: the upstream sees it drop and
        aborts."""
        headers = {"Content-Type": "application/json", **upstream.headers()}
        try:
            async with self._http().post(upstream.base_url + path, data=data, headers=headers,
                                         allow_redirects=False) as response:
                if response.status != 200:
                    await events.put(("status", (response.status, await response.read())))
                    return
                await events.put(("status", (200, b"")))
                payloads = _sse_payloads(response.content)
                async for payload in payloads:
                    await events.put(("data", payload))
                    if payload == "[DONE]":
                        # Read the body to its end (the chunked terminator follows [DONE] at once): a fully
                        # read response returns its connection to the pool, whereas leaving here would close
                        # it and make the next request pay a new TCP connection (measured: ~5 ms of TTFT).
                        with contextlib.suppress(*TRANSPORT_ERRORS):
                            async with asyncio.timeout(self.spec.timeouts.connect_s):
                                async for _ in payloads:
                                    pass
                        return
            await events.put(("end", None))
        except TRANSPORT_ERRORS as exc:
            await events.put(("error", exc))
        except Exception as exc:  # an SSE line over MAX_SSE_LINE, or a bug: fail the try, never hang the request
            log.warning("reading upstream %s failed: %s", upstream.name, type(exc).__name__, exc_info=True)
            await events.put(("error", UpstreamProtocolError(f"unreadable answer ({type(exc).__name__})")))


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


async def _sse_payloads(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data:` payloads of an SSE body (comments and other fields skipped). Lines end with "\n" (or
    "\r\n"); the last one may end with the body."""
    while line := await content.readuntil(b"\n", max_size=MAX_SSE_LINE):
        if line.startswith(b"data:"):
            yield line[5:].strip().decode(errors="replace")


def _error_message(raw: bytes) -> str:
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


def _tls_context() -> ssl.SSLContext:
    """The CA bundle httpx used: SSL_CERT_FILE, SSL_CERT_DIR, or else certifi's."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _describe(exc: BaseException) -> str:
    """Why a try failed, in words that name no address: aiohttp's messages carry the URL or host:port."""
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError / ConnectionTimeoutError included
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "name not resolved"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused" if isinstance(exc.os_error, ConnectionRefusedError) else "could not connect"
    if isinstance(exc, TRANSPORT_ERRORS):
        return type(exc).__name__
    return str(exc)
