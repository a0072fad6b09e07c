"""`POST /completion` and `POST /infill`: auth → schema → prompt → generate → llama-server's answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from deepserve.api import sse
from deepserve.api.auth import Principal, require_bearer
from deepserve.api.llamacpp import render
from deepserve.api.llamacpp.schemas import InfillRequest, NativeCompletionRequest
from deepserve.chat_options import apply_model_defaults
from deepserve.engine.types import FinishReason, TextPrompt, TokenDelta
from deepserve.errors import EngineError, InvalidRequestError
from deepserve.fim import infill_prompt_tokens
from deepserve.serving import ChoiceResult, ServedModel, metered_generate

PATHS = ("/completion", "/infill")
router = APIRouter(tags=["llama.cpp"])


def _model(request: Request, model_id: str | None) -> ServedModel:
    """The named model, or the one served (llama-server's requests name none)."""
    models = request.app.state.models
    if model_id is not None:
        return models.get(model_id)
    served = list(models)
    if len(served) != 1:
        raise InvalidRequestError(f"Name the model: this server serves {len(served)}.", param="model")
    return served[0]


@router.post("/completion", summary="llama-server's completion (raw prompt, its fields and answer)")
async def completion(body: NativeCompletionRequest, request: Request, _: Principal = Depends(require_bearer)) -> Response:
    model = _model(request, body.model)
    if isinstance(body.prompt, str):
        prompt: list[int] | TextPrompt = model.text_prompt_tokens(body.prompt)  # special tokens read, as there
    elif model.takes_text_prompts:
        raise InvalidRequestError("This model is served by an upstream engine: send the prompt as text.",
                                  param="prompt")
    else:
        prompt = list(body.prompt)
    if not len(prompt):
        raise InvalidRequestError("The prompt is empty.", param="prompt")
    return await _answer(request, model, body, prompt)


@router.post("/infill", summary="llama-server's code infill (the code around the cursor, other files' snippets)")
async def infill(body: InfillRequest, request: Request, _: Principal = Depends(require_bearer)) -> Response:
    model = _model(request, body.model)
    if model.takes_text_prompts:
        raise InvalidRequestError(f"The model `{model.model_id}` is served by an upstream engine, which builds "
                                  "its own infill prompt: send /infill there.", param="model")
    prompt = infill_prompt_tokens(model, body.input_prefix, body.input_suffix,
                                  [(c.filename, c.text) for c in body.input_extra], body.prompt,
                                  body.requested_max_tokens)
    return await _answer(request, model, body, prompt)


async def _answer(request: Request, model: ServedModel, body: NativeCompletionRequest,
                  prompt: list[int] | TextPrompt) -> Response:
    requested = body.requested_max_tokens
    clamped = False
    if requested is not None and not isinstance(prompt, TextPrompt) and 0 < model.ctx_size - len(prompt) < requested:
        # llama-server generates until the window is full rather than refusing (and says `truncated`).
        requested, clamped = model.ctx_size - len(prompt), True
    max_tokens = model.resolve_max_tokens(requested, len(prompt))
    tokenize = lambda text: model.engine.tokenize(text, add_special=False, parse_special=False)  # noqa: E731
    omitted = {"max_tokens"} if requested is None else set()
    sampling = apply_model_defaults(model, body.to_sampling(max_tokens, tokenize), omitted=omitted,
                                    num_prompt_tokens=len(prompt))
    sampling.max_tokens_fits_balance = requested is None
    check_grammar = getattr(model.engine, "check_grammar", None)
    if body.grammar and check_grammar is not None:
        await asyncio.to_thread(check_grammar, body.grammar)
    timings = render.Timings()
    stream = await metered_generate(request, model, prompt, sampling)
    answer = _Answer(body, model.model_id, _prompt_text(model, prompt, body), timings,
                     _settings(body, sampling.max_tokens),  # what billing left of a default n_predict
                     0 if isinstance(prompt, TextPrompt) else len(prompt),  # an upstream tells its count as it goes
                     sampling.max_tokens if clamped else None)
    if body.stream:
        return sse.sse_response(answer.events(stream))
    async for _ in answer.consume(stream):
        pass
    if answer.choice.error is not None:
        raise EngineError(f"The engine failed while generating: {answer.choice.error}")
    return JSONResponse(render.pick_fields(answer.result(streamed=False), body.response_fields))


class _Answer:
    """One request's answer as it comes: the choice so far, the editor stops, the timings."""

    def __init__(self, body: NativeCompletionRequest, model_id: str, prompt_text: str, timings: render.Timings,
                  settings: dict[str, Any], num_prompt_tokens: int, window_limit: int | None):
        self.body, self.model_id, self.prompt_text, self.timings = body, model_id, prompt_text, timings
        self.settings, self.num_prompt, self.window_limit = settings, num_prompt_tokens, window_limit
        self.choice = ChoiceResult(index=0)

    async def consume(self, stream: AsyncIterator[tuple[int, TokenDelta]]) -> AsyncIterator[TokenDelta]:
        async with contextlib.aclosing(stream):
            async for _, delta in stream:
                self.num_prompt = delta.num_prompt_tokens or self.num_prompt
                if delta.token_ids or delta.text:
                    self.timings.saw_token()
                self.choice.add(delta)
                yield delta
        self.timings.finished = time.perf_counter()

    async def events(self, stream: AsyncIterator[tuple[int, TokenDelta]]) -> AsyncIterator[bytes]:
        """One event a token (its text, id and probabilities), then the final result; no [DONE], as llama-server."""
        async with contextlib.aclosing(self.consume(stream)) as deltas:
            async for delta in deltas:
                if delta.error is not None:
                    yield sse.event(render.error_body(500, f"The engine failed while generating: {delta.error}",
                                                      "server_error"))
                    return
                if delta.text or delta.token_ids:
                    event = {"index": 0, "content": delta.text, "tokens": list(delta.token_ids), "stop": False,
                             "id_slot": render.NO_SLOT, "tokens_predicted": len(self.choice.token_ids),
                             "tokens_evaluated": self.num_prompt}
                    if self.body.n_probs > 0 and delta.logprobs:
                        event["completion_probabilities"] = render.probabilities(delta.logprobs)
                    yield sse.event(event)
        yield sse.event(render.pick_fields(self.result(streamed=True), self.body.response_fields))

    def result(self, *, streamed: bool) -> dict[str, Any]:
        choice = self.choice
        truncated = (self.window_limit is not None and choice.finish_reason == FinishReason.LENGTH
                     and choice.num_generated_tokens >= self.window_limit)
        return render.final_result(choice, model=self.model_id, prompt=self.prompt_text, timings=self.timings,
                                   settings=self.settings, streamed=streamed, return_tokens=self.body.return_tokens,
                                   want_probs=self.body.n_probs > 0, truncated=truncated)


def _prompt_text(model: ServedModel, prompt: list[int] | TextPrompt, body: NativeCompletionRequest) -> str:
    if isinstance(prompt, TextPrompt):
        return prompt.text or ""
    detokenize = getattr(model.engine, "detokenize", None)
    return detokenize(prompt) if detokenize else body.prompt if isinstance(body.prompt, str) else ""


def _settings(body: NativeCompletionRequest, max_tokens: int) -> dict[str, Any]:
    return {"n_predict": max_tokens, "seed": body.seed, "temperature": body.temperature, "top_k": body.top_k,
            "top_p": body.top_p, "min_p": body.min_p, "repeat_penalty": body.repeat_penalty,
            "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
            "stop": body.stop, "ignore_eos": body.ignore_eos, "n_probs": body.n_probs, "stream": body.stream,
            "grammar": body.grammar or ""}


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.state.errors.register(lambda path: path in PATHS, render.error_response, require_bearer)
