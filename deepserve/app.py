"""create_app(): the FastAPI application. The lifespan builds the services onto app.state."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from deepserve import __version__
from deepserve.api import health
from deepserve.api import balance as balance_routes
from deepserve.api import tokenize as tokenize_routes
from deepserve.api.admin import routes as admin_routes
from deepserve.api.arrivals import CountArrivals
from deepserve.api.content_type import JsonBodies
from deepserve.api.direct import CYCLE_KEY
from deepserve.api.disconnect import CancelOnDisconnect
from deepserve.api.auth import require_bearer
from deepserve.api.errors import ErrorRouter, openai_error_response
from deepserve.api.limits import BodySizeLimit
from deepserve.api.dataoorts import routes as dataoorts_routes
from deepserve.api.llamacpp import routes as llamacpp_routes
from deepserve.api.llamacpp.alias import NativeCompletionsAlias
from deepserve.api.openai import routes as openai_routes
from deepserve.api.segmind import routes as segmind_routes
from deepserve.api.workers_ai import routes as workers_ai_routes
from deepserve.billing.headers import BillingHeaders
from deepserve.billing.idempotency import IdempotencyMiddleware
from deepserve.billing.service import Billing
from deepserve.catalog import Catalog, default_catalog
from deepserve.catalog.plan import ModelPlan, assign_resources, plan_models
from deepserve.catalog.registry import LocalRegistry
from deepserve.config import Settings
from deepserve.engine.arrivals import ARRIVALS
from deepserve.engine.remote.config import RemoteModelSpec
from deepserve.observability import routes as metrics_routes
from deepserve.observability.requests import RequestObserver
from deepserve.serving import ModelRegistry, ServedModel
from deepserve.shutdown import Drain, DrainGuard
from deepserve.templates.chat import ChatTemplate, choose_template_source

log = logging.getLogger(__name__)


class DeepserveApp(FastAPI):
    """FastAPI that keeps uvicorn's connection of each HTTP request in its scope (api/direct.py writes plain
    tokens to its socket from the engine thread). The middlewares wrap `send`, so only here is it uvicorn's own."""

    async def __call__(self, scope, receive, send):  # type: ignore[override]
        if scope["type"] == "http":
            cycle = getattr(send, "__self__", None)
            if cycle is not None:
                scope[CYCLE_KEY] = cycle
        await super().__call__(scope, receive, send)


def load_served_model(settings: Settings, plan: ModelPlan | None = None) -> ServedModel:
    """Start one model's engine (default: the first model `plan_models` picks, i.e. `--model-path` or the
    bundled one) with its chat template and catalog facts."""
    from deepserve.engine.llamacpp.loop import LlamaCppEngine  # imports llama_cpp: only when serving

    if plan is None:
        plan = plan_models(settings, default_catalog(), LocalRegistry(settings.data_dir))[0]
    engine = LlamaCppEngine(
        plan.path,
        plan.model_id,
        ctx_size=plan.ctx_size or settings.ctx_size,
        parallel=settings.parallel,
        batch_size=settings.batch_size,
        threads=plan.threads or settings.threads,
        max_queue=settings.max_queue,
        kv_unified=settings.kv_unified,
        poll=settings.poll,
        cpus=plan.cpus,
        cache_ram_mib=plan.cache_ram_mib,
        arrivals=ARRIVALS,  # counted by CountArrivals (create_app): a lone request's first step does not wait
    )
    runner = engine.runner
    entry = plan.entry
    source = choose_template_source(
        operator=plan.template, gguf=runner.chat_template(), catalog=entry.chat_template if entry else None
    )
    template = ChatTemplate(
        source,
        bos_token=runner.token_text(runner.bos_token_id),
        eos_token=runner.token_text(runner.eos_token_id),
    )
    return ServedModel(
        model_id=plan.model_id, engine=engine, template=template,
        owned_by=entry.owned_by if entry else "deepserve", catalog=entry,
    )


def load_remote_model(spec: RemoteModelSpec, catalog: Catalog) -> ServedModel:
    """A model served by upstream engines (models file entries with `upstreams`); starts its health checks."""
    from deepserve.engine.remote import RemoteEngine

    entry = catalog.find(spec.id)
    engine = RemoteEngine(spec)
    engine.start()
    return ServedModel(model_id=spec.id, engine=engine, template=None,
                       owned_by=entry.owned_by if entry else "deepserve", catalog=entry)


def load_served_models(settings: Settings, registry: ModelRegistry) -> None:
    """Start every model the settings name, one engine each: the models file's (`--config`), else those
    deepserve.catalog.plan picks."""
    catalog = registry.catalog or default_catalog()
    local = registry.local or LocalRegistry(settings.data_dir)
    remote: list[RemoteModelSpec] = []
    if settings.config is not None:
        from deepserve.models_file import load_models_file

        models_file = load_models_file(settings.config, settings, catalog, local)
        plans, remote = assign_resources(models_file.local, settings), models_file.remote
    else:
        plans = plan_models(settings, catalog, local)
    try:
        for plan in plans:
            served = load_served_model(settings, plan)
            registry.add(served)
            log.info("serving %s from %s (%d threads, context %d)", plan.model_id, plan.path,
                     served.engine.stats().get("threads", 0), served.ctx_size)
            if served.ctx_size < settings.ctx_size:
                log.warning("%s: context is %d tokens, not --ctx-size %d: the model's window is no larger",
                            plan.model_id, served.ctx_size, settings.ctx_size)
        for spec in remote:
            registry.add(load_remote_model(spec, catalog))
            log.info("serving %s through %d upstream(s): %s", spec.id, len(spec.upstreams),
                     ", ".join(u.name for u in spec.upstreams))  # names only: never a key
    except BaseException:
        registry.close()  # engines already started must not outlive a failed start
        raise


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
        registry = models or ModelRegistry(default_catalog(), LocalRegistry(settings.data_dir))
        await billing.start()  # first: a database that cannot be reached stops the start before models load
        try:
            if owned:
                load_served_models(settings, registry)
            app.state.models = registry
            try:
                yield
            finally:
                if owned:
                    registry.close()
        finally:
            await billing.stop()

    app = DeepserveApp(title="deepserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.dev_key = dev_key
    billing = Billing(settings, keys)  # configured keys stay valid: the operator's own, unmetered
    app.state.billing = billing
    app.state.meter = billing.meter
    app.state.key_store = billing.key_store
    errors = ErrorRouter()
    errors.register("/v1/", openai_error_response, require_bearer)  # OpenAI's routes take a Bearer key
    errors.register(openai_routes.is_alias_path, openai_error_response, require_bearer)  # and outside /v1
    errors.install(app)
    app.state.errors = errors
    app.include_router(health.router)
    app.include_router(metrics_routes.router)  # /metrics, /v1/metrics: before Segmind's /v1/{slug}
    app.include_router(balance_routes.router)
    admin_routes.install(app)
    app.include_router(openai_routes.router)
    app.include_router(tokenize_routes.router)  # /tokenize, /detokenize (vLLM's and llama-server's)
    llamacpp_routes.install(app)  # /completion, /infill (llama-server's own API)
    workers_ai_routes.install(app)
    dataoorts_routes.install(app)
    segmind_routes.install(app)  # last: its /v1/{slug} must not shadow the OpenAI routes

    def render_error(scope, error):  # any error raised before routing, in the caller's dialect
        return errors.render(Request(scope), error)

    app.add_middleware(NativeCompletionsAlias)  # innermost: POST /completions without a model is llama-server's
    app.add_middleware(JsonBodies)  # a body sent as a form or unlabelled is still read as JSON
    app.add_middleware(BillingHeaders)  # x-remaining-credits, x-ratelimit-*: inside, so replays repeat them
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes, on_too_large=render_error)
    app.add_middleware(CancelOnDisconnect)  # sees the client leave whatever the route does
    app.state.drain = Drain()  # deepserve.shutdown.GracefulServer starts it on SIGTERM/SIGINT
    app.add_middleware(DrainGuard, drain=app.state.drain, render_error=render_error)  # 503 while shutting down
    if settings.allowed_origins:  # answers browsers' preflight OPTIONS before auth or routing see it
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["*"])
    app.add_middleware(CountArrivals)  # requests not yet submitted: the engines' first step waits for them
    app.add_middleware(RequestObserver, log_prompts=settings.log_prompts)  # outermost: request id, metrics, log
    return app
