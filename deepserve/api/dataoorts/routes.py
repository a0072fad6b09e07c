"""Dataoorts serverless: `POST /api/v1` with `Authorization: Bearer <key>`. Auth → schema → generate → render."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from deepserve.api.auth import Principal, require_bearer
from deepserve.api.dataoorts import render
from deepserve.api.dataoorts.schemas import DataoortsRequest
from deepserve.api.workers_ai.routes import complete
from deepserve.serving import ServedModel, messages_chars, prepare_off_loop

PATH = "/api/v1"

router = APIRouter(tags=["Dataoorts"])


@router.post(PATH, summary="Dataoorts serverless text generation")
async def run(body: DataoortsRequest, request: Request, _: Principal = Depends(require_bearer)) -> Response:
    model: ServedModel = request.app.state.models.get(body.model)
    messages = body.data.template_messages()
    prompt_tokens = await prepare_off_loop(messages_chars(messages), model.chat_prompt_tokens, messages)
    choice = await complete(request, model, prompt_tokens, body.data.to_sampling(model, len(prompt_tokens)))
    return JSONResponse(render.result_body(choice))


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.state.errors.register(lambda path: path == PATH, render.error_response, require_bearer)
