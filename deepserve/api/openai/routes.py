"""OpenAI-compatible routes: auth → schema → generate → render. Also what NIM and DeepRequest expose."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from deepserve.api import sse
from deepserve.api.auth import Principal, require_bearer
from deepserve.api.direct import MARK, DirectText
from deepserve.api.keepalive import JsonAfterBlankLines
from deepserve.api.openai import render
from deepserve.api.openai.schemas import ChatCompletionRequest, CompletionRequest
from deepserve.billing.accounts import price_overrides, resolve_price
from deepserve.billing.money import TokenPrices
from deepserve.chat_options import apply_model_defaults, prepare_chat
from deepserve.engine.types import TextPrompt, TokenDelta
from deepserve.errors import ContextLengthError, EngineError, InvalidRequestError
from deepserve.fim import fim_prompt_tokens, wants_fim
from deepserve.serving import (
    ChoiceResult, ServedModel, collect_stream, fan_in, messages_chars, metered_generate, metered_generate_many,
    prepare_off_loop,
)
from deepserve.tools import check_tools

router = APIRouter()
log = logging.getLogger(__name__)


def _model_card(model: ServedModel, overrides: dict[str, TokenPrices] | None) -> dict[str, Any]:
    card = {
        "id": model.model_id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "max_model_len": model.ctx_size,
        **model.card_facts(),  # catalog facts: context_window, pricing, aliases, defaults
    }
    if overrides:  # the operator's price wins over the catalog's, as it does when a request is charged
        entry = model.catalog
        names = (model.model_id, *(entry.names if entry else ()))
        listed = entry.prices if entry is not None else None
        price, source = resolve_price(
            overrides, names, TokenPrices(listed.input, listed.cached_input, listed.output) if listed else None)
        if source == "operator":
            card["pricing"] = {"unit": "nanodollars_per_million_tokens", "input": price.input,
                               "cached_input": price.cached_input, "output": price.output}
    return card


async def _price_overrides(request: Request) -> dict[str, TokenPrices] | None:
    billing = getattr(request.app.state, "billing", None)
    if billing is None:
        return None
    try:
        return await billing.db.run(price_overrides)
    except Exception:  # the listing still answers (catalog prices) when the database does not
        log.warning("could not read the operator's prices for /v1/models", exc_info=True)
        return None


# DeepSeek's clients take https://api.deepseek.com (no /v1) or its /beta (prefix and FIM completion) as their
# base URL, and llama-server answers without /v1 too: the same routes there, so only the host changes.
ALIAS_PREFIXES = ("", "/beta")


def is_alias_path(path: str) -> bool:
    """Whether `path` is one of the OpenAI routes outside /v1 (errors there are OpenAI's)."""
    for prefix in ALIAS_PREFIXES:
        rest = path[len(prefix):] if path.startswith(prefix + "/") else None
        if rest in ("/chat/completions", "/completions", "/models") or (rest or "").startswith("/models/"):
            return True
    return False


@router.get("/v1/models")
async def list_models(request: Request, _: Principal = Depends(require_bearer)) -> dict[str, Any]:
    overrides = await _price_overrides(request)
    return {"object": "list", "data": [_model_card(m, overrides) for m in request.app.state.models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, _: Principal = Depends(require_bearer)) -> dict[str, Any]:
    model = request.app.state.models.get(model_id)
    return _model_card(model, await _price_overrides(request))


def _late_answer(answer: Awaitable[Response], request: Request) -> Response:
    """A non-streaming answer that sends blank lines while it is late (api/keepalive.py)."""
    return JsonAfterBlankLines(answer, lambda error: request.app.state.errors.render(request, error))


def _raise_on_error(choices: list[ChoiceResult]) -> None:
    for choice in choices:
        if choice.error is not None:
            raise EngineError(f"The engine failed while generating: {choice.error}")


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, _: Principal = Depends(require_bearer)
) -> Response:
    return await chat_completion_response(body, request.app.state.models.get(body.model), request, blank_lines=True)


async def chat_completion_response(
    body: ChatCompletionRequest, model: ServedModel, request: Request, *, blank_lines: bool = False
) -> Response:
    """The OpenAI answer to `body` on `model`; also what the Workers AI and Segmind chat routes answer.
    `blank_lines`: a late non-streaming answer is preceded by blank lines, as DeepSeek's (api/keepalive.py)."""
    messages = body.template_messages()
    # tools, reasoning, response_format; a long chat off the event loop (serving.OFFLOAD_CHARS says why)
    chat = await prepare_off_loop(messages_chars(messages), prepare_chat, model, messages, body.chat_options())
    prompt_tokens = chat.prompt_tokens
    if isinstance(prompt_tokens, list) and len(prompt_tokens) >= model.ctx_size:  # OpenAI's words for a chat
        raise ContextLengthError(
            f"This model's maximum context length is {model.ctx_size} tokens. However, your messages resulted in "
            f"{len(prompt_tokens)} tokens, which leaves no room for the completion. Please reduce the length of the "
            f"messages.", param="messages")
    sampling = chat.configure(model, body.to_sampling(model.resolve_max_tokens(body.requested_max_tokens,
                                                                               len(prompt_tokens))),
                              omitted=body.omitted_sampling())
    sampling.max_tokens_fits_balance = body.requested_max_tokens is None
    stream = await metered_generate(request, model, prompt_tokens, sampling, body.n)
    response_id = render.new_id("chatcmpl")
    if body.stream:
        created = int(time.time())
        return sse.sse_response(_chat_events(response_id, created, body, stream),
                                direct=_direct_chat_text(response_id, created, body, stream))

    async def answer() -> Response:
        choices = await collect_stream(stream, body.n)
        _raise_on_error(choices)
        return JSONResponse(render.chat_completion(response_id, body.model, choices, body.logprobs))

    return _late_answer(answer(), request) if blank_lines else await answer()


def _direct_chat_text(
    response_id: str, created: int, body: ChatCompletionRequest, stream: AsyncIterator[tuple[int, TokenDelta]]
) -> DirectText | None:
    """A one-choice stream's plain text chunks, as _chat_events renders them, for the engine to write itself."""
    if body.n != 1 or body.logprobs:
        return None
    sample = render.chat_chunk(response_id, created, body.model, 0, {"content": MARK}, include_usage=body.include_usage)
    return DirectText(stream, sse.event(sample))


async def _chat_events(
    response_id: str, created: int, body: ChatCompletionRequest, stream: AsyncIterator[tuple[int, TokenDelta]]
) -> AsyncIterator[bytes]:
    include_usage = body.include_usage
    choices = [ChoiceResult(index=i) for i in range(body.n)]

    def chunk(index: int, delta: dict[str, Any], **kwargs: Any) -> bytes:
        return sse.event(
            render.chat_chunk(response_id, created, body.model, index, delta, include_usage=include_usage, **kwargs)
        )

    # A forced call answers with tool_calls and no content: null from the first chunk, as OpenAI streams it and as
    # the whole answer says (a stream accumulated by the SDK then equals it).
    forced = check_tools(body.tools, body.tool_choice)[1] is not None  # valid: prepare_chat checked them
    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": None if forced else ""})
    async with contextlib.aclosing(stream):
        async for index, delta in stream:
            choices[index].add(delta)
            if delta.error is not None:
                yield sse.event(render.error_body(f"The engine failed while generating: {delta.error}", "server_error"))
                continue
            logprobs = render.chat_logprobs(delta.logprobs) if body.logprobs and delta.logprobs else None
            content = render.chat_delta(delta)  # reasoning, content, tool calls
            if delta.finish_reason is not None:
                yield chunk(
                    index, content, logprobs=logprobs,
                    finish=render.finish_reason(delta.finish_reason), stop_reason=delta.stop_reason,
                )
            elif content or logprobs:
                yield chunk(index, content, logprobs=logprobs)
    if include_usage:
        yield sse.event(
            {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
             "choices": [], "usage": render.usage([choices])}
        )
    yield sse.DONE


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, _: Principal = Depends(require_bearer)) -> Response:
    model: ServedModel = request.app.state.models.get(body.model)
    prompts = body.prompts()
    fim = wants_fim(model, body.suffix)  # prompt = the code before the gap, suffix = the code after it
    if fim and body.echo:
        raise InvalidRequestError("echo cannot be combined with suffix (fill-in-the-middle).", param="echo")

    def prompt_tokens() -> list[list[int] | TextPrompt]:
        if fim:
            return [fim_prompt_tokens(model, p, body.suffix) for p in prompts]
        return [model.text_prompt_tokens(p) if isinstance(p, str) else list(p) for p in prompts]

    num_chars = sum(len(p) for p in prompts if isinstance(p, str)) + len(body.suffix or "")
    token_lists = await prepare_off_loop(num_chars, prompt_tokens)  # a long one off the event loop
    if body.echo and body.logprobs is not None and model.takes_text_prompts:
        # Scores read from an empty slice would be silently 0 (lm-evaluation-harness): refuse instead.
        raise InvalidRequestError("echo with logprobs needs the prompt tokens' logprobs, which this model's "
                                  "upstream engine does not report.", param="echo")
    detokenize = getattr(model.engine, "detokenize", None)
    texts = [p if isinstance(p, str) else detokenize(p) if body.echo and detokenize else "" for p in prompts]
    longest = max(len(t) for t in token_lists)
    sampling = apply_model_defaults(model, body.to_sampling(model.resolve_max_tokens(body.max_tokens, longest)),
                                    omitted=body.omitted_sampling())
    sampling.max_tokens_fits_balance = "max_tokens" not in body.model_fields_set or body.max_tokens is None
    streams = await metered_generate_many(request, model, token_lists, sampling, body.n)
    response_id = render.new_id("cmpl")
    prefixes = [texts[i // body.n] if body.echo else "" for i in range(len(prompts) * body.n)]
    if body.stream:
        created = int(time.time())
        return sse.sse_response(_completion_events(response_id, created, body, streams, prefixes),
                                direct=_direct_completion_text(response_id, created, body, streams, prefixes))

    async def answer() -> Response:
        try:
            groups = [await collect_stream(s, body.n) for s in streams]
        finally:  # a client gone while an earlier prompt was collected: the later prompts' requests are aborted too
            for stream in streams:
                await stream.aclose()
        flat = [c for group in groups for c in group]
        _raise_on_error(flat)
        return JSONResponse(
            render.text_completion(
                response_id, body.model, flat, prefixes=prefixes, want_logprobs=body.logprobs is not None,
                usage_body=render.usage(groups),
            )
        )

    return _late_answer(answer(), request)


async def _interleave(
    streams: list[AsyncIterator[tuple[int, TokenDelta]]],
) -> AsyncIterator[tuple[int, int, TokenDelta]]:
    """(prompt index, choice index, delta) from every prompt's stream as they come: the engine computes the
    prompts together, and OpenAI streams their choices interleaved (reading them one prompt after the other held
    each later prompt's tokens until the earlier ones had finished)."""
    if len(streams) == 1:
        async for index, delta in streams[0]:
            yield 0, index, delta
        return
    async with contextlib.aclosing(fan_in(streams)) as merged:
        async for prompt_index, (index, delta) in merged:
            yield prompt_index, index, delta


def _direct_completion_text(
    response_id: str, created: int, body: CompletionRequest, streams: list[AsyncIterator[tuple[int, TokenDelta]]],
    prefixes: list[str],
) -> DirectText | None:
    """One prompt's one choice without echo or logprobs: its plain text chunks, for the engine to write itself."""
    if len(streams) != 1 or body.n != 1 or body.logprobs is not None or prefixes[0]:
        return None
    sample = render.completion_chunk(response_id, created, body.model, 0, MARK, include_usage=body.include_usage)
    return DirectText(streams[0], sse.event(sample))


async def _completion_events(
    response_id: str, created: int, body: CompletionRequest, streams: list[AsyncIterator[tuple[int, TokenDelta]]],
    prefixes: list[str],
) -> AsyncIterator[bytes]:
    include_usage = body.include_usage
    groups = [[ChoiceResult(index=i) for i in range(body.n)] for _ in streams]
    echoed: set[int] = set()
    offsets = [0] * len(prefixes)  # each choice's text so far: where its next token starts (text_offset)
    try:
        async with contextlib.aclosing(_interleave(streams)) as merged:
            async for prompt_index, index, delta in merged:
                groups[prompt_index][index].add(delta)
                choice_index = prompt_index * body.n + index
                if delta.error is not None:
                    message = f"The engine failed while generating: {delta.error}"
                    yield sse.event(render.error_body(message, "server_error"))
                    continue
                text = delta.text
                prompt_logprobs = None
                if prefixes[choice_index] and choice_index not in echoed:
                    echoed.add(choice_index)
                    text = prefixes[choice_index] + text  # echo: the prompt leads the first chunk
                    offsets[choice_index] += len(prefixes[choice_index])
                    prompt_logprobs = delta.prompt_logprobs  # and its tokens' logprobs lead the first logprobs
                logprobs = None
                if body.logprobs is not None and (delta.logprobs or prompt_logprobs):
                    logprobs = render.completion_logprobs(delta.logprobs, offsets[choice_index], prompt_logprobs)
                # Offsets follow the tokens, as the whole answer's do (render.completion_logprobs): a token's text
                # may reach the client later than its logprob (held back while a stop string may match).
                offsets[choice_index] += sum(len(e.token) for e in delta.logprobs)
                finish = render.finish_reason(delta.finish_reason)
                if text or logprobs or finish:
                    yield sse.event(
                        render.completion_chunk(
                            response_id, created, body.model, choice_index, text, finish=finish,
                            stop_reason=delta.stop_reason, logprobs=logprobs, include_usage=include_usage,
                        )
                    )
    finally:
        for stream in streams:
            await stream.aclose()
    if include_usage:
        yield sse.event(
            {"id": response_id, "object": "text_completion", "created": created, "model": body.model,
             "choices": [], "usage": render.usage(groups)}
        )
    yield sse.DONE


for _prefix in ALIAS_PREFIXES:  # after /v1's own, so a listing of the routes shows those first
    for _path, _endpoint, _method in (("/models", list_models, "GET"), ("/models/{model_id:path}", get_model, "GET"),
                                      ("/chat/completions", chat_completions, "POST"),
                                      ("/completions", completions, "POST")):
        router.add_api_route(_prefix + _path, _endpoint, methods=[_method], include_in_schema=False)
