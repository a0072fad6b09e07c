"""Segmind: `POST /v1/{slug}` with `x-api-key: <key>` (a Bearer header is not read here).
Auth → schema → the OpenAI chat completion → `x-remaining-credits`.

The slug route shares /v1/ with the OpenAI API, so it is included after the OpenAI routes and its slug can
never be one of their first path segments (RESERVED_SLUGS): /v1/models, /v1/chat/completions,
/v1/completions and /v1/health/... stay OpenAI's, errors included.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from deepserve.api.auth import Principal, require_api_key
from deepserve.api.openai.routes import chat_completion_response
from deepserve.api.segmind.render import credits_headers, error_response
from deepserve.api.segmind.schemas import SegmindChatRequest
from deepserve.errors import ModelNotFoundError, NotFoundError
from deepserve.serving import ModelRegistry, ServedModel

# slug -> model id, in one place. None: the served model closest to what the slug names (find_model), for as
# long as the model the slug really names (through the catalog's aliases) is not served. A served model's own id
# is a slug too.
SLUGS: dict[str, str | None] = {"deepseek-reasoner": None}

# First path segments under /v1/ that belong to the OpenAI API (today's and likely next ones).
RESERVED_SLUGS = frozenset(
    {"models", "chat", "completions", "health", "embeddings", "responses", "files", "audio", "images",
     "moderations", "batches", "metrics", "fine_tuning", "assistants", "threads", "uploads", "vector_stores"}
)
SLUG_REGEX = r"(?!(?:" + "|".join(sorted(map(re.escape, RESERVED_SLUGS))) + r")$)[^/]+"
_SLUG_PATH = re.compile(r"/v1/" + SLUG_REGEX)


class SlugConvertor(Convertor[str]):
    """One path segment that is not a reserved OpenAI one: such paths never match a Segmind route."""

    regex = SLUG_REGEX

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("segmind_slug", SlugConvertor())
SLUG_ROUTE = "/v1/{slug:segmind_slug}"


def is_slug_path(path: str) -> bool:
    return _SLUG_PATH.fullmatch(path) is not None


def find_model(models: ModelRegistry, slug: str) -> ServedModel:
    try:
        return models.get(slug)
    except ModelNotFoundError:
        if slug not in SLUGS:
            message = f"The requested URL /v1/{slug} does not exist: no model has the slug `{slug}`."
            raise NotFoundError(message) from None
    target = SLUGS[slug]
    if target is not None:
        return models.get(target)
    served = list(models)
    if not served:
        raise NotFoundError(f"The requested URL /v1/{slug} does not exist: this server serves no model.")
    # Segmind's deepseek-reasoner is DeepSeek-R1: the served model closest to it, whatever order they load in.
    return min(served, key=_reasoner_rank)


def _reasoner_rank(model: ServedModel) -> int:
    """0: DeepSeek-R1 itself; 1: another reasoning model (an R1 distill); 2: any other model."""
    entry = model.catalog
    if entry is None or not entry.reasoning:
        return 2
    return 0 if entry.family == "deepseek-r1" else 1


router = APIRouter(tags=["Segmind"])


async def slug_model(slug: str, request: Request) -> ServedModel:
    """Dependency: the model the path's slug names (after auth, before the body is read: 401, then 404)."""
    return find_model(request.app.state.models, slug)


@router.post(SLUG_ROUTE, summary="Segmind chat (the slug names the model, e.g. deepseek-reasoner)")
async def run(
    slug: str,
    body: SegmindChatRequest,
    request: Request,
    _: Principal = Depends(require_api_key),
    model: ServedModel = Depends(slug_model),
) -> Response:
    response = await chat_completion_response(body.to_openai(slug), model, request)
    response.headers.update(credits_headers(request))
    return response


@router.api_route(SLUG_ROUTE, methods=["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False)
async def wrong_method(_: ServedModel = Depends(slug_model), __: Principal = Depends(require_api_key)) -> Response:
    """405 for a slug that exists (404 for one that does not, whatever the key: an OpenAI client's mistyped GET
    path gets its 404), as Segmind answers; after the key, so that its `x-remaining-credits` is the caller's
    balance and not a "0" that reads as out of credits."""
    raise StarletteHTTPException(405, headers={"Allow": "POST"})


def install(app: FastAPI) -> None:
    """Include after the OpenAI routes: theirs must match first."""
    app.include_router(router)
    app.state.errors.register(is_slug_path, error_response, require_api_key)
