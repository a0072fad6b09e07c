"""What every dialect shares between its schema and its renderer.

`ServedModel` turns messages or a raw prompt into prompt tokens the way the model was trained
(GGUF chat template, else the catalog's built-in one) and carries the model's catalog entry, whose defaults
(max_tokens, temperature, top_p, prices) the dialects apply. A model served by upstream engines
(`engine.takes_text_prompts`) has no local template or tokenizer: its "prompt tokens" are a `TextPrompt`
(the messages or the text, which the upstream renders), whose len() is an upper bound of its tokens. `generate()` runs n choices of one request on
the engine and yields (choice index, delta) pairs, merged as they arrive. Dialects call these and never
touch the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from deepserve.catalog import Catalog, CatalogEntry
from deepserve.catalog.registry import LocalRegistry
from deepserve.engine.arrivals import reached_engine
from deepserve.engine.base import Engine
from deepserve.engine.types import (
    FinishReason, GenerateRequest, Generation, SamplingParams, TextPrompt, TokenDelta, TokenLogprob, ToolCall,
    attach_direct, next_request_id,
)
from deepserve.errors import InvalidRequestError, ModelNotFoundError
from deepserve.observability.requests import observe_streams
from deepserve.templates.chat import ChatTemplate


T = TypeVar("T")

# A request whose text is at least this long is prepared (chat template, tokenizer) in a worker thread. Why: the
# tokenizer takes ~1.7 µs a token (7.8 ms for a 4,500-token prompt, 29 ms for 18,000, on the 2-core VM), and on the
# event loop that long is that long without a token for every other stream. llama_tokenize releases the GIL, so
# the loop goes on meanwhile. Shorter requests stay inline: a thread hop would cost more than it saves.
OFFLOAD_CHARS = 8192


async def prepare_off_loop(num_chars: int, prepare: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`prepare(*args, **kwargs)`: inline when the request's text (`num_chars`) is short, else in a worker thread
    (its errors raise here all the same)."""
    if num_chars < OFFLOAD_CHARS:
        return prepare(*args, **kwargs)
    return await asyncio.to_thread(prepare, *args, **kwargs)


def messages_chars(messages: list[dict[str, Any]]) -> int:
    """About how much text a chat's messages hold (what its preparation's cost follows)."""
    return sum(len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or "")) for m in messages)


# Where the last message's text goes when a chat continues it: private-use characters, which no template writes,
# trims or rewrites.
CONTINUE_MARK = "\ue000deepserve:continue\ue001"


@dataclass
class ServedModel:
    model_id: str
    engine: Engine
    template: ChatTemplate | None  # None for a model whose upstream engine renders its own template
    owned_by: str = "deepserve"
    created: int = field(default_factory=lambda: int(time.time()))
    catalog: CatalogEntry | None = None  # the model's facts, when the catalog knows it

    @property
    def ctx_size(self) -> int:
        return self.engine.ctx_size

    @property
    def takes_text_prompts(self) -> bool:
        """True when an upstream engine serves the model: prompts go to it as messages or text."""
        return bool(getattr(self.engine, "takes_text_prompts", False))

    def chat_prompt_tokens(self, messages: list[dict[str, Any]], *, generation: Generation = Generation.OPEN,
                           **template_kwargs: Any) -> list[int] | TextPrompt:
        if self.takes_text_prompts:
            return self.upstream_chat_prompt(messages, generation=generation)
        return self.engine.tokenize(self.chat_prompt_text(messages, generation, **template_kwargs),
                                    add_special=False, parse_special=True)  # the template writes BOS itself

    def chat_prompt_text(self, messages: list[dict[str, Any]], generation: Generation, **template_kwargs: Any) -> str:
        from deepserve.reasoning import open_reasoning, strip_reasoning_history  # earlier reasoning never goes back in

        history = strip_reasoning_history(messages)
        prefix = self.text_to_continue(messages[-1]) if generation is Generation.CONTINUE else ""
        if generation is Generation.CONTINUE and not prefix:  # nothing written yet: the assistant's turn opened
            history, generation = history[:-1], Generation.OPEN
        if generation is Generation.CONTINUE:
            # The chat rendered with a mark for the last message's text, cut at the mark, then the text as it was
            # given: what the template writes after a message (its end of turn) is left out, as vLLM's
            # continue_final_message does, and a template that trims or rewrites messages does not touch the text.
            history[-1] = {**history[-1], "content": CONTINUE_MARK}
            text = self.template.render(history, add_generation_prompt=False, **template_kwargs)
            at = text.rfind(CONTINUE_MARK)
            if at < 0:
                raise InvalidRequestError(f"The chat template of {self.model_id} drops the last message, so it "
                                          "cannot be continued (prefix).", param="messages")
            return text[:at] + prefix
        text = self.template.render(history, add_generation_prompt=generation is not Generation.NONE,
                                    **template_kwargs)
        if generation is not Generation.NONE and self.catalog is not None and self.catalog.reasoning:
            text = open_reasoning(text)  # an older R1 template leaves the <think> block to the model
        return text

    def text_to_continue(self, message: dict[str, Any]) -> str:
        """The last message's text as the model continues it. A reasoning model's `reasoning_content` (DeepSeek's
        prefix completion on deepseek-reasoner) leads it in a <think> block: left open when there is no answer
        text yet (the reasoning goes on), closed before the answer text otherwise."""
        from deepserve.reasoning import CLOSE_TAG, OPEN_TAG

        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if not reasoning or not isinstance(reasoning, str) or self.catalog is None or not self.catalog.reasoning:
            return content
        thought = f"{OPEN_TAG}\n{reasoning}"
        return f"{thought}\n{CLOSE_TAG}\n\n{content}" if content else thought

    def upstream_chat_prompt(self, messages: list[dict[str, Any]], **fields: Any) -> TextPrompt:
        """The chat for an upstream engine, with its tools (tools, tool_choice, parallel_tool_calls) as given."""
        from deepserve.reasoning import strip_reasoning_history

        if fields.get("generation") is Generation.CONTINUE:  # the message to continue goes as it was given
            return self.engine.chat_prompt(strip_reasoning_history(messages[:-1]) + messages[-1:], **fields)
        return self.engine.chat_prompt(strip_reasoning_history(messages), **fields)

    def text_prompt_tokens(self, prompt: str) -> list[int] | TextPrompt:
        if self.takes_text_prompts:
            return self.engine.text_prompt(prompt)
        # Special-token strings in a raw prompt are those tokens, as vLLM and llama-server read them: a prompt
        # written in the model's own format ("<|im_start|>user\n…", "<｜begin▁of▁sentence｜>User: …") works. A BOS
        # written at its start is not doubled by the one the model adds.
        tokens = self.engine.tokenize(prompt, add_special=True, parse_special=True)
        if len(tokens) >= 2 and tokens[0] == tokens[1] and tokens[:1] == self.engine.tokenize(
                "", add_special=True, parse_special=False):
            del tokens[0]
        return tokens

    def resolve_max_tokens(self, requested: int | None, num_prompt_tokens: int) -> int:
        """An omitted max_tokens means the catalog's default for this model (e.g. 100 for deepseek-r1-32b),
        else "up to the end of the context window", as vLLM does; never more than the window has room for.
        A request above the catalog's limit is refused."""
        entry = self.catalog
        if requested is not None:
            if entry is not None and entry.max_tokens_limit is not None and requested > entry.max_tokens_limit:
                raise InvalidRequestError(
                    f"max_tokens is {requested}, but {self.model_id} allows at most {entry.max_tokens_limit}.",
                    param="max_tokens",
                )
            return requested
        room = max(1, self.ctx_size - num_prompt_tokens)
        if entry is not None and entry.default_max_tokens is not None:
            return min(entry.default_max_tokens, room)
        return room

    def card_facts(self) -> dict[str, Any]:
        """Catalog facts for a model listing (GET /v1/models): window, prices, aliases, defaults."""
        entry = self.catalog
        if entry is None:
            return {}
        facts: dict[str, Any] = {
            "context_window": entry.context_window,
            "family": entry.family,
            "architecture": entry.architecture,
            "aliases": list(entry.aliases),
            "reasoning": entry.reasoning,
        }
        if entry.prices is not None:
            facts["pricing"] = {
                "unit": "nanodollars_per_million_tokens",  # integers: 1e-9 USD per 1,000,000 tokens
                "input": entry.prices.input,
                "cached_input": entry.prices.cached_input,
                "output": entry.prices.output,
            }
        defaults = {k: v for k, v in (("max_tokens", entry.default_max_tokens), ("temperature", entry.temperature),
                                      ("top_p", entry.top_p)) if v is not None}
        if defaults:
            facts["defaults"] = defaults
        if entry.max_tokens_limit is not None:
            facts["max_tokens_limit"] = entry.max_tokens_limit
        return facts


class ModelRegistry:
    """The models this server serves, found by id or catalog alias.

    With the catalog (and the local registry) it also explains why a known model is not served: weights not
    pulled, weights present but not loaded, or a model that only an upstream engine may serve.
    """

    def __init__(self, catalog: Catalog | None = None, local: LocalRegistry | None = None) -> None:
        self._models: dict[str, ServedModel] = {}
        self._names: dict[str, str] = {}  # every name a served model answers to -> its model_id
        self.catalog = catalog
        self.local = local

    def add(self, model: ServedModel) -> None:
        self._models[model.model_id] = model
        self._names[model.model_id] = model.model_id
        for name in model.catalog.names if model.catalog else ():
            self._names.setdefault(name, model.model_id)

    def get(self, model_id: str) -> ServedModel:
        served = self._names.get(model_id)
        if served is not None:
            return self._models[served]
        available = ", ".join(sorted(self._models)) or "none"
        entry = self.catalog.find(model_id) if self.catalog is not None else None
        if entry is None:
            message = f"The model `{model_id}` does not exist. Available models: {available}."
        elif not entry.can_run_in_process:
            message = (f"The model `{model_id}` ({entry.id}) is served only by an upstream engine (vLLM or SGLang), "
                       f"and this server has none configured. Available models: {available}.")
        elif entry.bundled or self._has_weights(entry.id):
            message = (f"The model `{model_id}` is not loaded by this server. Restart it with "
                       f"`deepserve serve --model {entry.id}`. Available models: {available}.")
        else:
            message = (f"The model `{model_id}` is in the catalog, but its weights are not on this server. "
                       f"Fetch them with `deepserve models pull {entry.id}` and restart the server. "
                       f"Available models: {available}.")
        raise ModelNotFoundError(message, param="model")

    def named_or_only(self, model_id: str | None) -> ServedModel:
        """The named model, or the one served when the request names none (llama-server's requests have no model
        field); a server with several models needs the name."""
        if model_id is not None:
            return self.get(model_id)
        if len(self._models) != 1:
            raise InvalidRequestError(f"Name the model: this server serves {len(self._models)}.", param="model")
        return next(iter(self._models.values()))

    def named_or_served(self, model_id: str | None) -> ServedModel:
        """As named_or_only, but a name this server does not know is ignored while it serves one model: llama-server
        ignores the field, and editor plugins send whatever model name their user configured."""
        if model_id is not None and model_id not in self._names and len(self._models) == 1:
            return next(iter(self._models.values()))
        return self.named_or_only(model_id)

    def _has_weights(self, model_id: str) -> bool:
        local = self.local.get(model_id) if self.local is not None else None
        return local is not None and local.is_present

    def __iter__(self):
        return iter(self._models.values())

    def close(self) -> None:
        for model in self._models.values():
            model.engine.close()


@dataclass(slots=True)
class ChoiceResult:
    """One choice collected to its end (non-streaming responses)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # echo + logprobs: the prompt's own
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    reasoning_text: str = ""  # deepseek reasoning format: the reasoning, apart from `text`
    num_reasoning_tokens: int = 0  # of num_generated_tokens (completion tokens), those spent reasoning
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: TokenDelta) -> None:
        self.text += delta.text
        self.reasoning_text += delta.reasoning_text
        self.tool_calls.extend(delta.tool_calls)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.prompt_logprobs.extend(delta.prompt_logprobs)
        if delta.finish_reason is not None:
            self.num_reasoning_tokens = delta.num_reasoning_tokens
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.error = delta.error
            self.num_prompt_tokens = delta.num_prompt_tokens
            self.num_cached_tokens = delta.num_cached_tokens
            self.num_generated_tokens = delta.num_generated_tokens


def generate(
    engine: Engine, prompt_tokens: list[int] | TextPrompt, sampling: SamplingParams, n: int = 1,
    submitted: list[GenerateRequest] | None = None,
) -> AsyncIterator[tuple[int, TokenDelta]]:
    """Submit n choices now (errors such as a full queue raise here) and return their merged stream.
    `submitted`, if given, receives the n requests (billing reads whether each was started)."""
    request_ids: list[str] = []
    streams: list[AsyncIterator[TokenDelta]] = []
    try:
        for i in range(n):
            # Distinct but reproducible seeds per choice: seed, seed+1, ...
            params = replace(sampling, seed=None if sampling.seed is None else sampling.seed + i)
            request = GenerateRequest(prompt_tokens=prompt_tokens, sampling=params, request_id=next_request_id())
            streams.append(engine.submit(request))
            request_ids.append(request.request_id)
            if submitted is not None:
                submitted.append(request)
        reached_engine()  # the local engine's submit says so itself; an upstream engine's does not
    except Exception:
        for request_id in request_ids:
            engine.abort(request_id)
        raise
    return _Merged(streams)


class _Merged:
    """The n choices' streams as one of (choice index, delta). Closing it closes every choice's stream (aborting
    what is unfinished) even when it was never read: a class, as StreamTap is, since an async generator closed
    before its first read runs nothing, and its engine streams went on generating for nobody."""

    __slots__ = ("_streams", "_merged")

    def __init__(self, streams: list[AsyncIterator[TokenDelta]]):
        self._streams = streams
        self._merged: Any = None

    def __aiter__(self) -> _Merged:
        return self

    async def __anext__(self) -> tuple[int, TokenDelta]:
        if self._merged is None:
            self._merged = _merge(self._streams)
        return await self._merged.__anext__()

    def attach_direct(self, sink: Any) -> bool:
        """A one-choice stream's engine request may deliver its plain text to `sink` (api/direct.py)."""
        return len(self._streams) == 1 and attach_direct(self._streams[0], sink)

    async def aclose(self) -> None:
        try:
            if self._merged is not None:
                await self._merged.aclose()
        finally:
            for stream in self._streams:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()


async def _merge(streams: list[AsyncIterator[TokenDelta]]) -> AsyncIterator[tuple[int, TokenDelta]]:
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for delta in stream:
                yield 0, delta
        return
    async with contextlib.aclosing(fan_in(streams)) as merged:
        async for index, delta in merged:
            yield index, delta


async def fan_in(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(stream index, item) from every stream as the items come, until each stream ends; a stream's failure
    is raised here. Closing it cancels the pumps, which closes each stream (aborting its request in the engine).
    For the n choices of one prompt (generate) and the prompts of one completion (its streaming response)."""
    queue: asyncio.Queue[tuple[int, bool, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        failure: BaseException | None = None
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, False, item))
        except Exception as error:  # handed to the reader, which raises it
            failure = error
        finally:
            queue.put_nowait((index, True, failure))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, ended, item = await queue.get()
            if ended:
                remaining -= 1
                if item is not None:
                    raise item
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _ReadAhead:
    """A stream whose first item was read before the response started; it is given again first.

    For engines that connect on the first read (`starts_on_first_read`: an upstream server), so that a
    failure to start (bad input the upstream refused, no upstream reachable) raises in the route and is
    answered with a status in the dialect's envelope instead of an error event in a 200 stream."""

    __slots__ = ("_first", "_inner")

    def __init__(self, first: tuple[int, TokenDelta], inner: AsyncIterator[tuple[int, TokenDelta]]):
        self._first: tuple[int, TokenDelta] | None = first
        self._inner = inner

    def __aiter__(self) -> _ReadAhead:
        return self

    async def __anext__(self) -> tuple[int, TokenDelta]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._inner.__anext__()

    def attach_direct(self, sink: Any) -> bool:
        return attach_direct(self._inner, sink)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def read_ahead(stream: AsyncIterator[tuple[int, TokenDelta]]) -> _ReadAhead:
    try:
        first = await stream.__anext__()
    except BaseException:
        await stream.aclose()
        raise
    return _ReadAhead(first, stream)


async def collect_stream(stream: AsyncIterator[tuple[int, TokenDelta]], n: int) -> list[ChoiceResult]:
    """Drain a `generate()` stream into one result per choice."""
    results = [ChoiceResult(index=i) for i in range(n)]
    async with contextlib.aclosing(stream):
        async for index, delta in stream:
            results[index].add(delta)
    return results


async def metered_generate(
    request: Any, model: ServedModel, prompt_tokens: list[int] | TextPrompt, sampling: SamplingParams, n: int = 1
) -> AsyncIterator[tuple[int, TokenDelta]]:
    """What every dialect route calls instead of `generate()`: the one place where a request is metered."""
    (stream,) = await metered_generate_many(request, model, [prompt_tokens], sampling, n)
    return stream


async def metered_generate_many(
    request: Any, model: ServedModel, prompts: list[list[int] | TextPrompt], sampling: SamplingParams, n: int = 1
) -> list[AsyncIterator[tuple[int, TokenDelta]]]:
    """Several prompts of one request (/v1/completions), n choices each, metered as one request.

    1. the caller (`request.state.principal`, set by auth) may use this model, else 403;
    2. a metered key reserves the worst case (every prompt token, max_tokens x n per prompt) with one
       conditional UPDATE, else 402 (or 429 for its rate limit) before the engine sees anything;
    3. the engine generates;
    4. when the last stream closes (done, client gone, engine error), what was computed is settled: the
       reservation is replaced by the charge, one usage record and its ledger row.
    Operator keys from configuration and --no-auth are not metered: their streams are `generate()`'s own.
    `request.state` gets `remaining_nanodollars` and `ratelimit_headers` for the response headers.
    """
    from deepserve.billing.meter import Charge, check_model_allowed
    from deepserve.billing.money import TokenPrices
    from deepserve.errors import InsufficientBalanceError, InvalidRequestError

    principal = getattr(request.state, "principal", None)
    names = (model.model_id, *(name for name in (model.catalog.names if model.catalog else ()) if name != model.model_id))
    check_model_allowed(principal, model.model_id, names)
    check_fits = getattr(model.engine, "check_fits", None)
    queue_limit = getattr(model.engine, "max_queue", None)
    if queue_limit is not None and n * len(prompts) > max(queue_limit, 1):
        # All of them are queued at once: more than the queue holds would get a 429 that no retry can cure.
        raise InvalidRequestError(
            f"This request asks for {n * len(prompts)} generations (n × prompts), more than this server queues at "
            f"once ({queue_limit}, --max-queue).", param="n" if len(prompts) == 1 else "prompt")
    for tokens in prompts:  # bad input is refused before any money moves
        if check_fits is not None:
            check_fits(len(tokens), sampling.max_tokens)
    meter = getattr(request.app.state, "meter", None)
    charge: Charge | None = None
    if meter is not None and principal is not None and principal.is_metered:
        prices = model.catalog.prices if model.catalog is not None else None
        num_sequences = n * len(prompts)
        try:
            reservation = await meter.reserve(
                principal, model_names=names,
                catalog_prices=TokenPrices(prices.input, prices.cached_input, prices.output) if prices else None,
                num_prompt_tokens=sum(len(tokens) for tokens in prompts),
                max_completion_tokens=sampling.max_tokens * num_sequences,
                min_completion_tokens=num_sequences if sampling.max_tokens_fits_balance else None,
            )
        except InsufficientBalanceError as error:
            request.state.remaining_nanodollars = getattr(error, "available_nanodollars", None)
            raise
        # A default max_tokens the balance did not cover: as many tokens each as it does.
        sampling.max_tokens = min(sampling.max_tokens, reservation.max_completion_tokens // num_sequences)
        request.state.remaining_nanodollars = reservation.available_after
        request.state.ratelimit_headers = reservation.rate_headers
        charge = Charge(
            # A TextPrompt's count is the upstream's to tell (its len() is only the bound reserved above).
            meter, reservation, [0 if isinstance(tokens, TextPrompt) else len(tokens) for tokens in prompts], n,
            request.url.path,
            on_settled=lambda available: setattr(request.state, "remaining_nanodollars", available),
        )
    streams: list[AsyncIterator[tuple[int, TokenDelta]]] = []
    requests: list[list[GenerateRequest]] = []
    try:
        for tokens in prompts:
            requests.append([])
            streams.append(generate(model.engine, tokens, sampling, n, requests[-1]))
            if getattr(model.engine, "starts_on_first_read", False):
                streams[-1] = await read_ahead(streams[-1])
    except BaseException:
        for stream in streams:
            await stream.aclose()
        if charge is not None:
            await charge.release()
        raise
    streams = observe_streams(request, model.model_id, prompts, n, streams)  # metrics + request log (observability)
    return charge.wrap(streams, requests) if charge is not None else streams
