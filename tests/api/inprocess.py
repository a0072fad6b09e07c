"""A deepserve app served by uvicorn in the test's own process, on real HTTP: the test can wrap the real engines
(RecordingEngine) and see the exact prompt tokens each request gave them."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import uvicorn

from deepserve.app import create_app, load_served_model
from deepserve.catalog import default_catalog
from deepserve.catalog.plan import ModelPlan
from deepserve.config import Settings
from deepserve.serving import ModelRegistry


class RecordingEngine:
    """The real engine, remembering the prompt tokens of every request it is given."""

    def __init__(self, engine):
        self._engine = engine
        self.prompts: list[list[int]] = []

    def submit(self, request):
        self.prompts.append(list(request.prompt_tokens))
        return self._engine.submit(request)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@contextlib.contextmanager
def serve_in_process(settings: Settings, models: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
    """Serve `models` ((model id, GGUF path)) with `settings`; yields the root URL and model id -> RecordingEngine."""
    catalog = default_catalog()
    registry = ModelRegistry(catalog)
    engines = {}
    try:
        for model_id, path in models:
            served = load_served_model(settings, ModelPlan(model_id, path, catalog.find(model_id)))
            served.engine = engines[model_id] = RecordingEngine(served.engine)
            registry.add(served)
        # Listening before uvicorn starts: a request sent at once waits in the backlog, no start-up race.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = uvicorn.Server(uvicorn.Config(create_app(settings, models=registry), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", engines
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            sock.close()
    finally:
        registry.close()
