from __future__ import annotations

import pytest

from tests.server import RunningServer, start_server


@pytest.fixture(scope="session")
def full_queue_server() -> RunningServer:
    """A server whose waiting queue holds nothing (--max-queue 0): every generation is refused with 429."""
    running = start_server("--parallel", "1", "--max-queue", "0", "--ctx-size", "256")
    yield running
    running.stop()
