"""`deepserve serve` options of operating it (the running behaviour is tested in tests/observability and
tests/test_shutdown.py)."""

from __future__ import annotations

import subprocess
import sys


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepserve", "serve", *args], capture_output=True, text=True,
                          timeout=60)


def test_an_unknown_log_format_is_refused_before_anything_loads():
    result = serve("--log-format", "xml")
    assert result.returncode == 2
    assert "--log-format" in result.stderr and "text, json" in result.stderr


def test_help_lists_the_operating_options():
    out = serve("--help").stdout
    for option in ("--log-format", "--log-prompts", "--shutdown-timeout", "--metrics-key"):
        assert option in out


def test_serve_names_h11_and_asyncio_rather_than_whatever_is_installed():
    """With httptools or uvloop installed (vLLM's environment), uvicorn's "auto" would pick them, and the engine's
    direct socket writes, which frame chunks as h11 does, would silently turn off."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from deepserve.cli import uvicorn_config
    from deepserve.config import Settings

    async def app(scope, receive, send):  # pragma: no cover - never called
        pass

    config = uvicorn_config(app, Settings(no_auth=True), "warning")
    assert (config.http, config.loop) == ("h11", "asyncio")
    config.load()
    assert config.http_protocol_class is H11Protocol
