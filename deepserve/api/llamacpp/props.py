"""llama-server's `GET /props` and `POST /apply-template`: what scripts and UIs read about the served model (its
window, default sampling, chat template, special tokens) and the prompt a chat renders to, before they send it
to /completion."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from deepserve import __version__
from deepserve.api.auth import Principal, require_bearer
from deepserve.api.llamacpp.routes import generation_settings
from deepserve.api.llamacpp.schemas import NativeCompletionRequest
from deepserve.api.openai.schemas import ChatCompletionRequest, ChatMessage
from deepserve.errors import InvalidRequestError
from deepserve.serving import ServedModel, messages_chars, prepare_off_loop

PATHS = ("/props", "/apply-template")
router = APIRouter(tags=["llama.cpp"])


def default_settings() -> dict[str, Any]:
    """The generation settings of a request that sets nothing (llama-server's `params` in /props)."""
    return generation_settings(NativeCompletionRequest(), -1)


def _token(model: ServedModel, token_id: int | None) -> str:
    runner = getattr(model.engine, "runner", None)
    return runner.token_text(token_id) if runner is not None and token_id is not None and token_id >= 0 else ""


@router.get("/props", summary="llama-server's server properties (window, default sampling, chat template)")
async def props(request: Request, model: str | None = None, _: Principal = Depends(require_bearer)) -> dict[str, Any]:
    served: ServedModel = request.app.state.models.named_or_served(model)
    runner = getattr(served.engine, "runner", None)
    return {
        "default_generation_settings": {"params": default_settings(), "n_ctx": served.ctx_size},
        "total_slots": getattr(served.engine, "parallel", 1),
        "model_alias": served.model_id,
        "model_path": getattr(served.engine, "model_path", ""),
        "modalities": {"vision": False, "video": False, "audio": False},
        "endpoint_slots": False, "endpoint_props": False, "endpoint_metrics": True,
        "chat_template": served.template.source if served.template is not None else "",
        "bos_token": _token(served, runner.bos_token_id if runner is not None else None),
        "eos_token": _token(served, runner.eos_token_id if runner is not None else None),
        "build_info": f"deepserve {__version__}",
        "is_sleeping": False,
    }


class ApplyTemplateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@router.post("/apply-template", summary="llama-server's chat template rendering: the prompt a chat becomes")
async def apply_template(body: ApplyTemplateRequest, request: Request,
                         _: Principal = Depends(require_bearer)) -> dict[str, str]:
    served: ServedModel = request.app.state.models.named_or_served(body.model)
    if served.template is None:
        raise InvalidRequestError(f"The model `{served.model_id}` is served by an upstream engine, which renders "
                                  "its own chat template.", param="model")
    chat = ChatCompletionRequest(model=served.model_id, messages=body.messages,
                                 continue_final_message=body.continue_final_message,
                                 add_generation_prompt=body.add_generation_prompt and not body.continue_final_message)
    messages = chat.template_messages()
    prompt = await prepare_off_loop(messages_chars(messages), served.chat_prompt_text, messages, chat.generation())
    return {"prompt": prompt}
