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
