"""The `deepserve` command line (typer)."""

from __future__ import annotations

import logging

import typer
import uvicorn

from deepserve.cli_credits import app as credits_app
from deepserve.cli_db import app as db_app
from deepserve.cli_keys import app as keys_app
from deepserve.cli_models import app as models_app
from deepserve.cli_prices import app as prices_app
from deepserve.cli_usage import app as usage_app
from deepserve.config import Settings
from deepserve.observability.logs import FORMATS, configure_logging
from deepserve.shutdown import GracefulServer

app = typer.Typer(help="deepserve: self-hosted inference for DeepSeek models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
app.add_typer(usage_app, name="usage")
app.add_typer(prices_app, name="prices")
app.add_typer(db_app, name="db")


class _Server(GracefulServer):
    """Prints one ready line once the socket is listening (port 0 resolves to the real port); drains on
    SIGTERM/SIGINT (deepserve.shutdown)."""

    def __init__(self, config: uvicorn.Config, settings: Settings):
        super().__init__(config, drain=config.app.state.drain, timeout_s=settings.shutdown_timeout_s)
        self._settings = settings

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        port = self._settings.port
        for server in self.servers:
            for sock in server.sockets:
                port = sock.getsockname()[1]
        fastapi_app = self.config.loaded_app
        while hasattr(fastapi_app, "app") and not hasattr(fastapi_app, "state"):
            fastapi_app = fastapi_app.app
        state = fastapi_app.state
        model_ids = ",".join(m.model_id for m in state.models)
        if self._settings.no_auth:
            key = "none (--no-auth)"
        elif state.dev_key:
            key = state.dev_key
        else:
            key = "(configured)"
        print(
            f"deepserve ready: url=http://{self._settings.host}:{port}/v1 model={model_ids} api_key={key}",
            flush=True,
        )


@app.command()
def serve(
    model_path: str = typer.Option(None, help="GGUF file to serve (default: the bundled SmolLM2-135M-Instruct)."),
    model_id: str = typer.Option(None, help="Model id clients send (default: from the file name)."),
    model: list[str] = typer.Option(
        None, "--model", help="Catalog or registered id to serve (repeatable; default: every registered model)."
    ),
    template: str = typer.Option(None, help="Built-in chat template for every model served (overrides the GGUF's)."),
    config: str = typer.Option(None, "--config", help="Models file (YAML): serve exactly the local and "
                               "upstream-served (vLLM, SGLang, ...) models it lists. See deploy/README.md."),
    data_dir: str = typer.Option(None, help="Model registry and weights folder (default ~/.local/share/deepserve)."),
    host: str = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default 8000; 0 picks a free one)."),
    threads: int = typer.Option(None, help="CPU threads of each model (default: the cores, split between models)."),
    ctx_size: int = typer.Option(None, help="Context window of one request (default 2048; at most the model's)."),
    parallel: int = typer.Option(None, help="Sequences decoded together (default 8)."),
    batch_size: int = typer.Option(None, help="Tokens per decode step, caps prefill chunks (default 512)."),
    max_queue: int = typer.Option(None, help="Requests that may wait for a slot before 429 (default 1024)."),
    kv_unified: bool = typer.Option(None, "--kv-unified/--kv-split", help="One KV pool for all slots."),
    cache_ram: int = typer.Option(
        None, "--cache-ram",
        help="MiB of RAM per model for slots' KV saved before other requests overwrite them, restored when a "
             "prompt shares their prefix (default 8192 as llama-server, at most a quarter of the RAM; 0: off)."),
    pin_threads: bool = typer.Option(
        None, "--pin-threads/--no-pin-threads",
        help="Pin each model's llama.cpp threads to CPUs of their own (default on, when the threads use exactly this process's CPUs)."),
    poll: int = typer.Option(None, help="ggml worker polling between steps, 0-100 (default 0: sleep); only for a llama.cpp built without "
        "OpenMP (make's build uses OpenMP: GOMP_SPINCOUNT governs its workers)."),
    api_key: list[str] = typer.Option(None, help="Accepted API key (repeatable; default: DEEPSERVE_API_KEYS)."),
    no_auth: bool = typer.Option(None, "--no-auth", help="Accept requests without a key (local development)."),
    database_url: str = typer.Option(None, help="Billing database URL (default: SQLite deepserve.db in the data dir)."),
    admin_key: str = typer.Option(None, help="Key for the /admin/ API (default: DEEPSERVE_ADMIN_KEY; none: off)."),
    sse_keepalive: float = typer.Option(None, help="Idle seconds before an SSE `: keep-alive` comment, or a blank line before a late non-streaming answer (default 10)."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
    log_format: str = typer.Option(None, help="Log lines as `text` or `json` (one object a line; default text)."),
    log_prompts: bool = typer.Option(None, "--log-prompts", help="Put each request's prompt in its log line."),
    shutdown_timeout: float = typer.Option(
        None, help="Seconds running requests get to finish after SIGTERM/SIGINT (default 30)."),
    metrics_key: str = typer.Option(None, help="Bearer token that /metrics requires (default: none, open)."),
    allowed_origin: list[str] = typer.Option(
        None, help="Origin browsers may call from (repeatable; default *: any; `none`: no CORS)."),
) -> None:
    """Serve the OpenAI-compatible API."""
    overrides = {
        "model_path": model_path, "model_id": model_id, "models": model or None, "template": template,
        "config": config,
        "data_dir": data_dir, "host": host, "port": port, "threads": threads,
        "ctx_size": ctx_size, "parallel": parallel, "batch_size": batch_size, "max_queue": max_queue,
        "kv_unified": kv_unified, "cache_ram_mib": cache_ram, "poll": poll, "pin_threads": pin_threads, "api_keys": api_key or None, "no_auth": no_auth,
        "sse_keepalive_s": sse_keepalive, "database_url": database_url, "admin_key": admin_key,
        "log_format": log_format, "log_prompts": log_prompts, "shutdown_timeout_s": shutdown_timeout,
        "metrics_key": metrics_key,
        "allowed_origins": ([] if allowed_origin == ["none"] else allowed_origin) if allowed_origin else None,
    }
    if log_format is not None and log_format not in FORMATS:
        raise typer.BadParameter(f"must be one of {', '.join(FORMATS)}", param_hint="--log-format")
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    _check_models(settings)
    from deepserve.app import create_app

    configure_logging(settings.log_format, logging.INFO)  # uvicorn's loggers too (log_config=None below)
    _Server(uvicorn_config(create_app(settings), settings, log_level), settings).run()


def uvicorn_config(app, settings: Settings, log_level: str) -> uvicorn.Config:
    """uvicorn's settings for `serve`. Its HTTP parser and event loop are named, not "auto": with httptools or
    uvloop installed (vLLM's environment has both, through uvicorn[standard]) "auto" would pick them, and the
    engine's direct socket writes (api/direct.py) frame chunks as h11 does and were measured on asyncio's loop;
    under httptools they would silently turn off and every token would take the event loop's slower path."""
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, log_config=None,
        http="h11", loop="asyncio",
        timeout_graceful_shutdown=5,  # only after a second signal, or for idle connections after the drain
    )


def _check_models(settings: Settings) -> None:
    """Refuse to start, with the command that fixes it, when a named model cannot be served."""
    from deepserve.catalog import default_catalog
    from deepserve.catalog.plan import ModelUnavailableError, plan_models
    from deepserve.catalog.registry import LocalRegistry

    if settings.config is not None and (settings.model_path or settings.models):
        typer.echo("deepserve: --config lists the models to serve: give it, or --model / --model-path, not both.",
                   err=True)
        raise typer.Exit(2)
    try:
        if settings.config is not None:
            from deepserve.models_file import load_models_file

            load_models_file(settings.config, settings, default_catalog(), LocalRegistry(settings.data_dir))
        else:
            plan_models(settings, default_catalog(), LocalRegistry(settings.data_dir))
    except ModelUnavailableError as exc:
        typer.echo(f"deepserve: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def selfcheck(num_tokens: int = typer.Option(8, help="Tokens to decode.")) -> None:
    """Load the bundled model and decode a few tokens: proves the llama.cpp build runs on this CPU."""
    from deepserve.bundled import bundled_model_path
    from deepserve.engine.llamacpp.runner import BatchEntry, LlamaRunner
    from deepserve.engine.types import SamplingParams

    runner = LlamaRunner(str(bundled_model_path()), ctx_size_per_seq=256, num_seqs=2, batch_size=64, num_threads=2)
    prompt = runner.tokenize("The capital of France is", add_special=True, parse_special=False)
    sampler = runner.new_sampler(SamplingParams(temperature=0.0), seed=0)
    rows = runner.decode([BatchEntry(0, prompt, 0, True)])
    out: list[int] = []
    for pos in range(len(prompt), len(prompt) + num_tokens):
        out.append(runner.sample(sampler, rows[0]))
        rows = runner.decode([BatchEntry(0, [out[-1]], pos, True)])
    text = b"".join(runner.token_piece(t) for t in out).decode("utf-8", errors="replace")
    runner.free_sampler(sampler)
    runner.close()
    if not text.strip():
        raise typer.Exit(code=1)
    print(f"selfcheck ok: decoded {len(out)} tokens: {text!r}")


@app.command()
def version() -> None:
    """Print the version."""
    from deepserve import __version__

    print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
