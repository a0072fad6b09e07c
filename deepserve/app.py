"""create_app(): the FastAPI application. The lifespan builds the services onto app.state."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.requests import Request

from deepserve import __version__
from deepserve.api import health
from deepserve.api.auth import StaticKeyStore
from deepserve.api.errors import ErrorRouter
from deepserve.api.limits import BodySizeLimit
from deepserve.api.openai import routes as openai_routes
from deepserve.bundled import BUNDLED_MODEL_ID, bundled_model_path
from deepserve.config import Settings
from deepserve.serving import ModelRegistry, ServedModel
from deepserve.templates.chat import CHATML_TEMPLATE, ChatTemplate

log = logging.getLogger(__name__)


def load_served_model(settings: Settings) -> ServedModel:
    from deepserve.engine.llamacpp.loop import LlamaCppEngine  # imports llama_cpp: only when serving

    if settings.model_path:
        path = settings.model_path
        model_id = settings.model_id or path.rsplit("/", 1)[-1].removesuffix(".gguf")
    else:
        path = str(bundled_model_path())
        model_id = settings.model_id or BUNDLED_MODEL_ID
    engine = LlamaCppEngine(
        path,
        model_id,
        ctx_size=settings.ctx_size,
        parallel=settings.parallel,
        batch_size=settings.batch_size,
        threads=settings.threads,
        max_queue=settings.max_queue,
        kv_unified=settings.kv_unified,
    )
    runner = engine.runner
    template = ChatTemplate(
        runner.chat_template() or CHATML_TEMPLATE,
        bos_token=runner.token_text(runner.bos_token_id),
        eos_token=runner.token_text(runner.eos_token_id),
    )
    return ServedModel(model_id=model_id, engine=engine, template=template)


def resolve_dev_key(settings: Settings) -> str | None:
    """With no keys configured and auth on, a fresh development key is made for this run."""
    if settings.no_auth or settings.api_keys:
        return None
    return "ds-dev-" + secrets.token_urlsafe(18)


def create_app(settings: Settings | None = None, models: ModelRegistry | None = None) -> FastAPI:
    settings = settings or Settings()
    dev_key = resolve_dev_key(settings)
    keys = settings.api_keys or ([dev_key] if dev_key else [])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = models is None
        registry = models or ModelRegistry()
        if owned:
            registry.add(load_served_model(settings))
        app.state.models = registry
        try:
            yield
        finally:
            if owned:
                registry.close()

    app = FastAPI(title="deepserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.dev_key = dev_key
    app.state.key_store = StaticKeyStore(keys, allow_anonymous=settings.no_auth)
    errors = ErrorRouter()
    errors.install(app)
    app.state.errors = errors
    app.include_router(health.router)
    app.include_router(openai_routes.router)

    def too_large(scope, error):
        return errors.render(Request(scope), error)

    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes, on_too_large=too_large)
    return app
