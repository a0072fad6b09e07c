"""Real `deepserve serve` processes for the operating tests, and a reader for their metrics page and logs."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import RunningServer, start_server

API_KEY = "sk-observability-secret-7Qx2"


@pytest.fixture(scope="package")
def json_server() -> RunningServer:
    """JSON logs, prompt logging off (the default)."""
    running = start_server("--log-format", "json", "--parallel", "4", "--ctx-size", "512", api_key=API_KEY)
    yield running
    running.stop()


class Scrape:
    """One reading of /metrics: every sample by name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 when the series does not exist yet (a counter that never moved)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


def scrape(root_url: str, path: str = "/metrics", **headers: str) -> Scrape:
    r = httpx.get(root_url + path, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return Scrape(r.text)


def log_lines(running: RunningServer) -> list[dict[str, Any]]:
    """The server's JSON log lines (anything else on stderr, e.g. llama.cpp's own prints, is skipped)."""
    lines = []
    for line in running.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def request_line(running: RunningServer, request_id: str, timeout_s: float = 30) -> dict[str, Any]:
    """The log line of one request. It is written when the response is complete on the server, which can be
    just after the client has read it: poll the log (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [line for line in log_lines(running)
                 if line.get("logger") == "deepserve.requests" and line.get("request_id") == request_id]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < deadline, f"no log line for {request_id}:\n{running.log()[-3000:]}"
        time.sleep(0.05)


def text_line(running: RunningServer, needle: str, timeout_s: float = 30) -> str:
    """The one line of the server's log containing `needle` (polled, bounded: see request_line)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [line for line in running.log().splitlines() if needle in line]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < deadline, f"no log line with {needle!r}:\n{running.log()[-3000:]}"
        time.sleep(0.05)
