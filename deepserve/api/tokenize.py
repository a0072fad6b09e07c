"""`POST /tokenize` and `POST /detokenize`, as vLLM and llama-server expose them (same paths, their fields).

Clients count tokens before a request (to fit the context, to estimate its price) with the model's own
tokenizer. One route takes either server's request and answers with both servers' fields:

    tokenize    {"model"?, "prompt" (vLLM) | "content" (llama-server) | "messages" (vLLM: the chat as the model is
                 prompted), "add_special_tokens" | "add_special", "with_pieces"?}
             -> {"tokens": [...], "count": n, "max_model_len": ctx} (+ "token_strs" with pieces, and llama-server's
                 [{"id", "piece"}] form of "tokens" when with_pieces is true)
    detokenize  {"model"?, "tokens": [...]} -> {"prompt": text, "content": text}

`model` may be left out when one model is served (llama-server has no model field). Keys as on /v1.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from deepserve.api.auth import Principal, require_bearer
from deepserve.api.openai.schemas import ChatCompletionRequest, ChatMessage
from deepserve.errors import InvalidRequestError
from deepserve.serving import ServedModel, messages_chars, prepare_off_loop

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_special: bool | None = None
    parse_special: bool | None = None  # llama-server's: special-token strings as those tokens (default) or as text
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM: count the chat as a continuation of its last message
    with_pieces: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


def _local_model(request: Request, model_id: str | None) -> ServedModel:
    model = request.app.state.models.named_or_only(model_id)
    if model.takes_text_prompts:
        raise InvalidRequestError(f"The model `{model.model_id}` is served by an upstream engine: tokenize there.",
                                  param="model")
    return model


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, _: Principal = Depends(require_bearer)) -> dict[str, Any]:
    model = _local_model(request, body.model)
    texts = [t for t in (body.prompt, body.content) if t is not None]
    if len(texts) + (body.messages is not None) != 1:
        raise InvalidRequestError("Send exactly one of prompt, content or messages.", param="prompt")
    if body.messages is not None:
        chat = ChatCompletionRequest(model=model.model_id, messages=body.messages,
                                     continue_final_message=body.continue_final_message,
                                     add_generation_prompt=body.add_generation_prompt and not body.continue_final_message)
        messages = chat.template_messages()
        tokens = await prepare_off_loop(messages_chars(messages), model.chat_prompt_tokens, messages,
                                        generation=chat.generation())  # a long one off the event loop
    else:
        # vLLM adds the model's special tokens by default; llama-server's add_special defaults to false
        add = body.add_special_tokens if body.add_special_tokens is not None else \
            body.add_special if body.add_special is not None else body.content is None
        parse = body.parse_special if body.parse_special is not None else True  # as prompts are read
        tokens = await prepare_off_loop(len(texts[0]), model.engine.tokenize, texts[0], add_special=add,
                                        parse_special=parse)
    answer: dict[str, Any] = {"tokens": list(tokens), "count": len(tokens), "max_model_len": model.ctx_size}
    if body.with_pieces or body.return_token_strs:
        pieces = [model.engine.detokenize([t]) for t in tokens]
        answer["token_strs"] = pieces
        if body.with_pieces:  # llama-server's: a piece that is not UTF-8 on its own (part of a character) as bytes
            answer["tokens"] = [{"id": t, "piece": _piece(model.engine.token_bytes(t))} for t in tokens]
    return answer


def _piece(raw: bytes) -> str | list[int]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest, request: Request, _: Principal = Depends(require_bearer)
) -> dict[str, Any]:
    model = _local_model(request, body.model)
    vocabulary = getattr(getattr(model.engine, "runner", None), "num_vocab", None)
    bad = [t for t in body.tokens if vocabulary is not None and not 0 <= t < vocabulary]
    if bad:
        raise InvalidRequestError(f"Token id {bad[0]} is not in this model's vocabulary of {vocabulary}.",
                                  param="tokens")
    text = model.engine.detokenize(body.tokens)
    return {"prompt": text, "content": text}
