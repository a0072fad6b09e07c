"""Upstream engines: models served by OpenAI-compatible servers (vLLM, SGLang, llama-server, deepserve)."""

from deepserve.engine.remote.config import RemoteModelSpec, UpstreamSpec
from deepserve.engine.remote.engine import RemoteEngine

__all__ = ["RemoteEngine", "RemoteModelSpec", "UpstreamSpec"]
