"""Cloudflare Workers AI: `POST /client/v4/accounts/{account_id}/ai/run/{model}` and its OpenAI-format twin
`POST /client/v4/accounts/{account_id}/ai/v1/chat/completions`. Auth → schema → generate → render.

The account id is accepted and ignored (one tenant per key for now). Every error under /client/v4/ is
answered in Cloudflare's v4 envelope with Cloudflare's codes (render.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from deepserve.api import sse
from deepserve.api.auth import Principal, require_bearer
from deepserve.api.direct import MARK, DirectText
from deepserve.api.openai.routes import chat_completion_response
from deepserve.api.openai.schemas import ChatCompletionRequest
from deepserve.api.workers_ai import render
from deepserve.api.workers_ai.schemas import RunRequest
from deepserve.engine.types import SamplingParams, TokenDelta
from deepserve.errors import EngineError, ModelNotFoundError
from deepserve.serving import (
    ChoiceResult, ModelRegistry, ServedModel, collect_stream, metered_generate, prepare_off_loop,
)

PATH_PREFIX = "/client/v4/"
CATALOG_PREFIXES = ("@cf/", "@hf/")  # Cloudflare's namespaces in front of a model's own name

router = APIRouter(tags=["Cloudflare Workers AI"])


def find_model(models: ModelRegistry, name: str) -> ServedModel:
    """The served model `name` means: as given, else without its `@cf/` / `@hf/` namespace."""
    try:
        return models.get(name)
    except ModelNotFoundError as error:
        reason = error.message
    for prefix in CATALOG_PREFIXES:
        if name.startswith(prefix):
            with contextlib.suppress(ModelNotFoundError):
                return models.get(name.removeprefix(prefix))
    raise ModelNotFoundError(f"No such model {name} or task. {reason}", param="model")


async def complete(
    request: Request, model: ServedModel, prompt_tokens: list[int], sampling: SamplingParams
) -> ChoiceResult:
    """One choice generated to its end (metered); an engine failure raises EngineError."""
    (choice,) = await collect_stream(await metered_generate(request, model, prompt_tokens, sampling), 1)
    if choice.error is not None:
        raise EngineError(f"The engine failed while generating: {choice.error}")
    return choice


@router.post("/client/v4/accounts/{account_id}/ai/run/{model_name:path}", summary="Run a Workers AI model")
async def run(
    account_id: str, model_name: str, body: RunRequest, request: Request, _: Principal = Depends(require_bearer)
) -> Response:
    model = find_model(request.app.state.models, model_name)
    num_chars = len(body.prompt or "") + sum(len(m.content) for m in body.messages or ())
    prompt_tokens = await prepare_off_loop(num_chars, body.prompt_tokens, model)  # a long one off the event loop
    sampling = body.to_sampling(model, len(prompt_tokens))  # the model's defaults, reasoning, response_format
    if body.stream:
        stream = await metered_generate(request, model, prompt_tokens, sampling)
        # Plain text deltas are `{"response": text}` events (render.stream_event), which the engine thread may write
        # itself (api/direct.py).
        return sse.sse_response(_events(stream), direct=DirectText(stream, sse.event({"response": MARK})))
    return JSONResponse(render.result_body(await complete(request, model, prompt_tokens, sampling)))


async def _events(stream: AsyncIterator[tuple[int, TokenDelta]]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(stream):
        async for _, delta in stream:
            event = render.stream_event(delta)
            if event:
                yield event
    yield sse.DONE


@router.post(
    "/client/v4/accounts/{account_id}/ai/v1/chat/completions", summary="OpenAI-format chat completions on Workers AI"
)
async def chat_completions(
    account_id: str, body: ChatCompletionRequest, request: Request, _: Principal = Depends(require_bearer)
) -> Response:
    return await chat_completion_response(body, find_model(request.app.state.models, body.model), request)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.state.errors.register(PATH_PREFIX, render.error_response, require_bearer)
