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
from deepserve.serving import ChoiceResult, ServedModel, fan_in, metered_generate_many, prepare_off_loop

PATHS = ("/completion", "/infill")
router = APIRouter(tags=["llama.cpp"])


@router.post("/completion", summary="llama-server's completion (raw prompt, its fields and answer)")
async def completion(body: NativeCompletionRequest, request: Request, _: Principal = Depends(require_bearer)) -> Response:
    model = request.app.state.models.named_or_served(body.model)
    prompts = body.prompts()
    num_chars = sum(len(p) for p in prompts if isinstance(p, str))  # a long one off the event loop
    return await _answer(request, model, body, await prepare_off_loop(
        num_chars, lambda: [_prompt(model, p) for p in prompts]))


def _prompt(model: ServedModel, prompt: str | list[int]) -> list[int] | TextPrompt:
    if isinstance(prompt, str):
        tokens: list[int] | TextPrompt = model.text_prompt_tokens(prompt)  # special tokens read, as there
    elif model.takes_text_prompts:
        raise InvalidRequestError("This model is served by an upstream engine: send the prompt as text.",
                                  param="prompt")
    else:
        tokens = list(prompt)
    if not len(tokens):
        raise InvalidRequestError("The prompt is empty.", param="prompt")
    return tokens


@router.post("/infill", summary="llama-server's code infill (the code around the cursor, other files' snippets)")
async def infill(body: InfillRequest, request: Request, _: Principal = Depends(require_bearer)) -> Response:
    model = request.app.state.models.named_or_served(body.model)
    if model.takes_text_prompts:
        raise InvalidRequestError(f"The model `{model.model_id}` is served by an upstream engine, which builds "
                                  "its own infill prompt: send /infill there.", param="model")
    extra = [(c.filename, c.text) for c in body.input_extra]
    num_chars = len(body.input_prefix) + len(body.input_suffix) + len(body.prompt) + sum(len(t) for _, t in extra)
    prompt = await prepare_off_loop(num_chars, infill_prompt_tokens, model, body.input_prefix, body.input_suffix,
                                    extra, body.prompt, body.requested_max_tokens)  # a long one off the event loop
    return await _answer(request, model, body, [prompt])


async def _answer(request: Request, model: ServedModel, body: NativeCompletionRequest,
                  prompts: list[list[int] | TextPrompt]) -> Response:
    longest = max(len(p) for p in prompts)
    requested = body.requested_max_tokens
    local = not any(isinstance(p, TextPrompt) for p in prompts)
    if requested is not None and local and 0 < model.ctx_size - longest < requested:
        # llama-server generates until the window is full rather than refusing (and says `truncated`).
        requested = model.ctx_size - longest
    max_tokens = model.resolve_max_tokens(requested, longest)
    tokenize = lambda text: model.engine.tokenize(text, add_special=False, parse_special=False)  # noqa: E731
    omitted = {"max_tokens"} if requested is None else set()
    sampling = apply_model_defaults(model, body.to_sampling(max_tokens, tokenize), omitted=omitted,
                                    num_prompt_tokens=longest)
    sampling.max_tokens_fits_balance = requested is None
    check_grammar = getattr(model.engine, "check_grammar", None)
    if body.grammar and check_grammar is not None:
        await asyncio.to_thread(check_grammar, body.grammar)
    streams = await metered_generate_many(request, model, prompts, sampling)
    settings = generation_settings(body, sampling.max_tokens)  # what billing left of a default n_predict
    answers = [_Answer(i, body, model.model_id, _prompt_text(model, p, body), settings,
                       0 if isinstance(p, TextPrompt) else len(p),  # an upstream tells its count as it goes
                       model.ctx_size) for i, p in enumerate(prompts)]
    if body.stream:
        return sse.sse_response(_events(answers, streams))
    try:
        for answer, stream in zip(answers, streams):
            async for _, delta in stream:
                answer.add(delta)
    finally:  # a client gone while an earlier prompt was read: the later prompts' requests are aborted too
        for stream in streams:
            await stream.aclose()
    for answer in answers:
        if answer.choice.error is not None:
            raise EngineError(f"The engine failed while generating: {answer.choice.error}")
    results = [render.pick_fields(a.result(streamed=False), body.response_fields) for a in answers]
    # Several prompts: an array of results, as llama-server answers them (one prompt: the result itself).
    return JSONResponse(results[0] if body.single_prompt else results)


async def _events(answers: list[_Answer], streams: list[AsyncIterator[tuple[int, TokenDelta]]]) -> AsyncIterator[bytes]:
    """One event a token (its text, id and probabilities; `index`: its prompt), then each prompt's final result
    when it ends; no [DONE], as llama-server."""
    async with contextlib.aclosing(fan_in(streams)) as merged:
        async for index, (_, delta) in merged:
            answer = answers[index]
            answer.add(delta)
            if delta.error is not None:
                yield sse.event(render.error_body(500, f"The engine failed while generating: {delta.error}",
                                                  "server_error"))
                return
            if delta.text or delta.token_ids:
                yield sse.event(answer.token_event(delta))
            if delta.finish_reason is not None:
                yield sse.event(render.pick_fields(answer.result(streamed=True), answer.body.response_fields))


class _Answer:
    """One prompt's answer as it comes: the choice so far and its timings."""

    def __init__(self, index: int, body: NativeCompletionRequest, model_id: str, prompt_text: str,
                 settings: dict[str, Any], num_prompt_tokens: int, ctx_size: int):
        self.index, self.body, self.model_id, self.prompt_text = index, body, model_id, prompt_text
        self.settings, self.num_prompt, self.ctx_size = settings, num_prompt_tokens, ctx_size
        self.timings = render.Timings()
        self.choice = ChoiceResult(index=0)

    def add(self, delta: TokenDelta) -> None:
        self.num_prompt = delta.num_prompt_tokens or self.num_prompt
        if delta.token_ids or delta.text:
            self.timings.saw_token()
        self.choice.add(delta)
        if delta.finish_reason is not None:
            self.timings.finished = time.perf_counter()

    def token_event(self, delta: TokenDelta) -> dict[str, Any]:
        event = {"index": self.index, "content": delta.text, "tokens": list(delta.token_ids), "stop": False,
                 "id_slot": render.NO_SLOT, "tokens_predicted": len(self.choice.token_ids),
                 "tokens_evaluated": self.num_prompt}
        if self.body.n_probs > 0 and delta.logprobs:
            event["completion_probabilities"] = render.probabilities(delta.logprobs)
        return event

    def result(self, *, streamed: bool) -> dict[str, Any]:
        choice = self.choice
        # llama-server's `truncated`: the answer ended because the window was full (n_predict -1 or past the room)
        truncated = (choice.finish_reason == FinishReason.LENGTH
                     and self.num_prompt + choice.num_generated_tokens >= self.ctx_size)
        result = render.final_result(choice, model=self.model_id, prompt=self.prompt_text, timings=self.timings,
                                     settings=self.settings, streamed=streamed,
                                     return_tokens=self.body.return_tokens, want_probs=self.body.n_probs > 0,
                                     truncated=truncated)
        result["index"] = self.index
        return result


def _prompt_text(model: ServedModel, prompt: list[int] | TextPrompt, body: NativeCompletionRequest) -> str:
    if isinstance(prompt, TextPrompt):
        return prompt.text or ""
    detokenize = getattr(model.engine, "detokenize", None)
    return detokenize(prompt) if detokenize else body.prompt if isinstance(body.prompt, str) else ""


def generation_settings(body: NativeCompletionRequest, max_tokens: int) -> dict[str, Any]:
    return {"n_predict": max_tokens, "seed": body.seed, "temperature": body.temperature, "top_k": body.top_k,
            "top_p": body.top_p, "min_p": body.min_p, "repeat_penalty": body.repeat_penalty,
            "repeat_last_n": body.repeat_last_n,
            "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
            "stop": body.stop, "ignore_eos": body.ignore_eos, "n_probs": body.n_probs, "stream": body.stream,
            "grammar": body.grammar or ""}


def install(app: FastAPI) -> None:
    from deepserve.api.llamacpp import props

    app.include_router(router)
    app.include_router(props.router)
    paths = (*PATHS, *props.PATHS)
    app.state.errors.register(lambda path: path in paths, render.error_response, require_bearer)
