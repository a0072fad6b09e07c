"""Prometheus metrics, served at `GET /metrics` and NIM's `GET /v1/metrics`.

Names follow Prometheus conventions: `deepserve_` prefix, base units (`_seconds`), `_total` on counters.
Labels are bounded: `model` is a served model id, `dialect` one of openai / workers_ai / dataoorts /
segmind / admin / other, `status` an HTTP status code, `finish_reason` one of the engine's five, `upstream`
an operator-configured engine URL. Never a key, a prompt, an account or a request id.

Request-path metrics (histograms, token counters) live in one process-wide registry and are recorded by
`deepserve.observability.requests`. Engine gauges (queue, running sequences, KV cache) are read from each
engine's `stats()` when Prometheus scrapes, so they cost nothing between scrapes.

For engines that live elsewhere (vLLM, SGLang, another deepserve), the router reports health with
`set_upstream_health(model, upstream, up)`; `forget_upstream()` drops an upstream that left the config.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from deepserve import __version__

log = logging.getLogger(__name__)

# No `_created` series next to every counter and histogram (as vLLM does): they double the page for nothing.
disable_created_metrics()

REGISTRY = CollectorRegistry()

# Token latencies on a CPU are tens of milliseconds, on a GPU a few; time to first token includes the queue.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 240.0, 480.0, 960.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "deepserve_time_to_first_token_seconds",
    "Time from receiving a generation request to its first generated token (queue and prefill included).",
    ["model", "dialect"], buckets=TTFT_BUCKETS, registry=REGISTRY,
)
INTER_TOKEN_LATENCY = Histogram(
    "deepserve_inter_token_latency_seconds",
    "Time between consecutive generated tokens of one choice.",
    ["model", "dialect"], buckets=ITL_BUCKETS, registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "deepserve_request_duration_seconds",
    "End-to-end latency of generation requests: received to last byte sent (streams included).",
    ["model", "dialect"], buckets=E2E_BUCKETS, registry=REGISTRY,
)
REQUESTS = Counter(
    "deepserve_requests",
    "HTTP requests answered, by served model (empty when none was reached), dialect and status code.",
    ["model", "dialect", "status"], registry=REGISTRY,
)
CHOICES_FINISHED = Counter(
    "deepserve_choices_finished",
    "Generated choices (n per prompt) by how they ended: stop, length, tool_calls, abort (client gone or "
    "shutdown), error.",
    ["model", "dialect", "finish_reason"], registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "deepserve_prompt_tokens", "Prompt tokens of generation requests (cached ones included), as usage reports them.",
    ["model", "dialect"], registry=REGISTRY,
)
CACHED_PROMPT_TOKENS = Counter(
    "deepserve_cached_prompt_tokens", "Prompt tokens served from the prompt (prefix) cache.",
    ["model", "dialect"], registry=REGISTRY,
)
GENERATION_TOKENS = Counter(
    "deepserve_generation_tokens", "Generated (completion) tokens, reasoning included, as usage reports them.",
    ["model", "dialect"], registry=REGISTRY,
)
REASONING_TOKENS = Counter(
    "deepserve_reasoning_tokens", "Generated tokens spent reasoning (inside <think>); also in generation tokens.",
    ["model", "dialect"], registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "deepserve_requests_in_flight", "HTTP requests being answered (metrics scrapes and health probes excluded).",
    registry=REGISTRY,
)
DRAINING = Gauge(
    "deepserve_draining", "1 while the server shuts down: new requests get 503, running ones finish.",
    registry=REGISTRY,
)
UPSTREAM_UP = Gauge(
    "deepserve_upstream_up", "1 when an upstream engine of a model is healthy, 0 when it is ejected or down.",
    ["model", "upstream"], registry=REGISTRY,
)
BUILD = Info("deepserve_build", "The deepserve version serving.", registry=REGISTRY)
BUILD.info({"version": __version__})


def upstream_label(upstream: str) -> str:
    """An upstream URL as a label: scheme, host, port and path only (never user:password@ or a query)."""
    parts = urllib.parse.urlsplit(upstream)
    if not parts.scheme or not parts.hostname:
        return upstream
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    if ":" in parts.hostname:  # IPv6
        host = f"[{parts.hostname}]" if parts.port is None else f"[{parts.hostname}]:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def set_upstream_health(model: str, upstream: str, up: bool) -> None:
    """Report an upstream engine's health (the router calls this on every check and ejection/recovery).

    `model`: the served model id; `upstream`: the upstream's base URL as configured (credentials and query
    strings are stripped here). Exported as `deepserve_upstream_up{model, upstream}` 1 / 0."""
    UPSTREAM_UP.labels(model=model, upstream=upstream_label(upstream)).set(1 if up else 0)


def forget_upstream(model: str, upstream: str) -> None:
    """Stop exporting an upstream (removed from the configuration)."""
    try:
        UPSTREAM_UP.remove(model, upstream_label(upstream))
    except KeyError:
        pass


class EngineCollector:
    """Engine gauges read from `engine.stats()` at scrape time, one series per served model.

    An engine exports what its stats have: `num_waiting` (queue length), `num_running`, and for the
    llama.cpp engine `kv_used_tokens` / `kv_capacity_tokens` / `kv_cached_tokens`, `prompt_cache` (host
    memory), `tokenizer_cache` (chat prompt pieces), `num_steps`, `num_decode_errors`. A remote engine may give
    `kv_cache_usage` (0..1) directly."""

    def __init__(self, models: Callable[[], Iterable[Any]]):
        self._models = models

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, documentation: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=["model"])

        def counter(name: str, documentation: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, documentation, labels=["model"])

        waiting = gauge("deepserve_num_requests_waiting", "Requests waiting for a slot (queue length).")
        running = gauge("deepserve_num_requests_running", "Sequences being prefilled or decoded.")
        kv_usage = gauge("deepserve_kv_cache_usage_ratio", "Share of the KV cache held by running sequences (0 to 1).")
        kv_capacity = gauge("deepserve_kv_cache_capacity_tokens", "KV cache size in tokens.")
        kv_cached = gauge("deepserve_kv_cache_cached_tokens",
                          "Tokens whose KV the slots hold, idle prompt-cache entries included.")
        ram_bytes = gauge("deepserve_prompt_cache_ram_bytes",
                          "Bytes of slot KV the host-memory prompt cache holds (--cache-ram).")
        ram_entries = gauge("deepserve_prompt_cache_ram_entries", "Saved slot states in host memory.")
        ram_restored = counter("deepserve_prompt_cache_ram_restored_tokens",
                               "Prompt tokens copied back from host memory instead of computed.")
        pieces_bytes = gauge("deepserve_tokenizer_cache_bytes",
                             "Bytes of chat prompt pieces and their tokens the tokenizer keeps.")
        pieces_hits = counter("deepserve_tokenizer_cache_hits",
                              "Chat prompt pieces whose tokens were kept from an earlier prompt.")
        pieces_misses = counter("deepserve_tokenizer_cache_misses",
                                "Chat prompt pieces tokenized (not kept from an earlier prompt).")
        steps = counter("deepserve_engine_steps", "Engine steps (one batched decode each).")
        errors = counter("deepserve_engine_decode_errors", "Failed batched decodes.")
        for model in self._models() or ():
            try:
                stats = model.engine.stats()
            except Exception:  # one broken engine must not take the whole page down
                log.exception("stats of %s failed", model.model_id)
                continue
            labels = [model.model_id]
            if "num_waiting" in stats:
                waiting.add_metric(labels, stats["num_waiting"])
            if "num_running" in stats:
                running.add_metric(labels, stats["num_running"])
            if "kv_cache_usage" in stats:
                kv_usage.add_metric(labels, stats["kv_cache_usage"])
            elif stats.get("kv_capacity_tokens"):
                kv_usage.add_metric(labels, stats.get("kv_used_tokens", 0) / stats["kv_capacity_tokens"])
            if "kv_capacity_tokens" in stats:
                kv_capacity.add_metric(labels, stats["kv_capacity_tokens"])
            if "kv_cached_tokens" in stats:
                kv_cached.add_metric(labels, stats["kv_cached_tokens"])
            ram = stats.get("prompt_cache")
            if ram:
                ram_bytes.add_metric(labels, ram["bytes"])
                ram_entries.add_metric(labels, ram["entries"])
                ram_restored.add_metric(labels, ram["num_restored_tokens"])
            pieces = stats.get("tokenizer_cache")
            if pieces:
                pieces_bytes.add_metric(labels, pieces["bytes"])
                pieces_hits.add_metric(labels, pieces["num_hits"])
                pieces_misses.add_metric(labels, pieces["num_misses"])
            if "num_steps" in stats:
                steps.add_metric(labels, stats["num_steps"])
            if "num_decode_errors" in stats:
                errors.add_metric(labels, stats["num_decode_errors"])
        yield from (waiting, running, kv_usage, kv_capacity, kv_cached, ram_bytes, ram_entries, ram_restored,
                    pieces_bytes, pieces_hits, pieces_misses, steps, errors)


class _Page:
    """What one scrape reads: the process registry, then the engines of this app."""

    def __init__(self, *collectors: Any):
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def render_page(models: Callable[[], Iterable[Any]], accept: str | None) -> tuple[bytes, str]:
    """The metrics page in the format the scraper asks for (Prometheus text, or OpenMetrics): body, type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(_Page(REGISTRY, EngineCollector(models))), content_type
