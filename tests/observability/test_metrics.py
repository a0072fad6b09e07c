"""/metrics against a real server: every value moves the way the requests made it move."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.billing.servers import dialect_request, usage_of
from tests.observability.conftest import API_KEY, Scrape, request_line, scrape
from tests.server import start_server

TOKEN_COUNTERS = ("deepserve_prompt_tokens_total", "deepserve_cached_prompt_tokens_total",
                  "deepserve_generation_tokens_total", "deepserve_reasoning_tokens_total")
HISTOGRAMS = ("deepserve_time_to_first_token_seconds", "deepserve_inter_token_latency_seconds",
              "deepserve_request_duration_seconds")


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def test_a_chat_completion_moves_counters_by_its_usage_and_histograms_by_one(json_server):
    model = json_server.model
    labels = {"model": model, "dialect": "openai"}
    client = openai.OpenAI(base_url=json_server.base_url, api_key=API_KEY, max_retries=0)
    before = scrape(json_server.root_url)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Count from one to twenty."}], max_tokens=12,
        temperature=0, extra_body={"ignore_eos": True},
    )
    usage = raw.parse().usage
    request_line(json_server, raw.headers["x-request-id"])  # written after the request's metrics
    after = scrape(json_server.root_url)

    assert usage.completion_tokens == 12
    assert moved(before, after, "deepserve_generation_tokens_total", **labels) == usage.completion_tokens
    assert moved(before, after, "deepserve_prompt_tokens_total", **labels) == usage.prompt_tokens
    assert moved(before, after, "deepserve_cached_prompt_tokens_total", **labels) == \
        usage.prompt_tokens_details.cached_tokens
    assert moved(before, after, "deepserve_reasoning_tokens_total", **labels) == 0
    assert moved(before, after, "deepserve_requests_total", status="200", **labels) == 1
    assert moved(before, after, "deepserve_choices_finished_total", finish_reason="length", **labels) == 1
    assert moved(before, after, "deepserve_time_to_first_token_seconds_count", **labels) == 1
    assert moved(before, after, "deepserve_request_duration_seconds_count", **labels) == 1
    # one gap between each two consecutive tokens of the choice
    assert moved(before, after, "deepserve_inter_token_latency_seconds_count", **labels) == usage.completion_tokens - 1
    assert moved(before, after, "deepserve_request_duration_seconds_sum", **labels) >= \
        moved(before, after, "deepserve_time_to_first_token_seconds_sum", **labels) > 0


def test_a_stream_with_two_choices_counts_each_choice(json_server):
    model = json_server.model
    labels = {"model": model, "dialect": "openai"}
    before = scrape(json_server.root_url)
    body = {"model": model, "messages": [{"role": "user", "content": "Say a word."}], "max_tokens": 6, "n": 2,
            "temperature": 0.9, "seed": 3, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", json_server.base_url + "/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        request_id = r.headers["x-request-id"]
    usage = events[-1]["usage"]
    request_line(json_server, request_id)
    after = scrape(json_server.root_url)

    assert usage["completion_tokens"] == 12
    assert moved(before, after, "deepserve_generation_tokens_total", **labels) == 12
    assert moved(before, after, "deepserve_prompt_tokens_total", **labels) == usage["prompt_tokens"]  # once for n
    assert moved(before, after, "deepserve_choices_finished_total", finish_reason="length", **labels) == 2
    assert moved(before, after, "deepserve_requests_total", status="200", **labels) == 1
    assert moved(before, after, "deepserve_time_to_first_token_seconds_count", **labels) == 1  # one per request
    assert moved(before, after, "deepserve_request_duration_seconds_count", **labels) == 1
    assert moved(before, after, "deepserve_inter_token_latency_seconds_count", **labels) == 2 * (6 - 1)


def test_a_stream_the_engine_thread_writes_itself_is_measured_as_one_through_the_loop(json_server):
    """A one-choice stream's text goes out from the engine thread (api/direct.py): its first token, each gap
    and its tokens are counted all the same, and the request log has its time to first token."""
    model = json_server.model
    labels = {"model": model, "dialect": "openai"}
    before = scrape(json_server.root_url)
    health_before = httpx.get(json_server.root_url + "/health").json()["engines"][0]["num_direct_tokens"]
    body = {"model": model, "messages": [{"role": "user", "content": "Count from one to twenty."}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", json_server.base_url + "/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        request_id = r.headers["x-request-id"]
    line = request_line(json_server, request_id)
    after = scrape(json_server.root_url)
    health_after = httpx.get(json_server.root_url + "/health").json()["engines"][0]["num_direct_tokens"]

    assert health_after > health_before  # the case this test is about
    assert sum(1 for e in events if e["choices"][0]["delta"].get("content")) == 12
    assert moved(before, after, "deepserve_generation_tokens_total", **labels) == 12
    assert moved(before, after, "deepserve_time_to_first_token_seconds_count", **labels) == 1
    assert moved(before, after, "deepserve_inter_token_latency_seconds_count", **labels) == 12 - 1
    assert 0 < line["ttft_ms"] <= line["latency_ms"] and line["completion_tokens"] == 12


@pytest.mark.parametrize("dialect", ["workers_ai", "dataoorts", "segmind", "openai"])
def test_each_dialect_is_labelled_as_itself(json_server, dialect):
    model = json_server.model
    labels = {"model": model, "dialect": dialect}
    before = scrape(json_server.root_url)
    with httpx.Client(base_url=json_server.root_url, timeout=120) as http:
        r = http.request(**dialect_request(dialect, model, API_KEY, max_tokens=5))
    assert r.status_code == 200, r.text
    usage = usage_of(dialect, r.json())
    request_line(json_server, r.headers["x-request-id"])
    after = scrape(json_server.root_url)

    assert moved(before, after, "deepserve_requests_total", status="200", **labels) == 1
    assert moved(before, after, "deepserve_generation_tokens_total", **labels) == usage["completion_tokens"] > 0
    assert moved(before, after, "deepserve_prompt_tokens_total", **labels) == usage["prompt_tokens"]
    assert moved(before, after, "deepserve_time_to_first_token_seconds_count", **labels) == 1
    for other in {"openai", "workers_ai", "dataoorts", "segmind"} - {dialect}:  # nothing leaks to another label
        assert moved(before, after, "deepserve_requests_total", model=model, dialect=other, status="200") == 0
        assert moved(before, after, "deepserve_generation_tokens_total", model=model, dialect=other) == 0


def test_a_refused_request_counts_its_status_without_a_model_or_tokens(json_server):
    before = scrape(json_server.root_url)
    r = httpx.post(json_server.base_url + "/chat/completions", headers={"Authorization": "Bearer wrong-key"},
                   json={"model": json_server.model, "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
    assert r.status_code == 401
    line = request_line(json_server, r.headers["x-request-id"])
    after = scrape(json_server.root_url)
    assert line["status"] == 401 and line["model"] is None
    assert moved(before, after, "deepserve_requests_total", model="", dialect="openai", status="401") == 1
    for name in TOKEN_COUNTERS:
        assert moved(before, after, name, model=json_server.model, dialect="openai") == 0


def test_the_page_parses_and_v1_metrics_is_the_same_page(json_server):
    model = json_server.model
    first = httpx.get(json_server.root_url + "/metrics", timeout=30)
    nim = httpx.get(json_server.root_url + "/v1/metrics", timeout=30)
    assert first.status_code == nim.status_code == 200
    assert first.headers["content-type"] == nim.headers["content-type"]
    assert first.headers["content-type"].startswith("text/plain; version=")
    a, b = Scrape(first.text), Scrape(nim.text)
    assert set(a.families) == set(b.families)
    for name in (*HISTOGRAMS, "deepserve_requests", "deepserve_num_requests_waiting", "deepserve_num_requests_running",
                 "deepserve_kv_cache_usage_ratio", "deepserve_upstream_up", "deepserve_requests_in_flight"):
        assert name in a.families, name
    for name in HISTOGRAMS:
        assert a.families[name].type == "histogram"
    assert a.families["deepserve_generation_tokens"].type == "counter"  # exposed as ..._total
    # engine gauges, read from the engine at scrape time
    assert a.value("deepserve_kv_cache_capacity_tokens", model=model) == 512 * 4
    assert a.value("deepserve_num_requests_waiting", model=model) == 0
    assert a.value("deepserve_draining") == 0
    # no label carries a key, and scrapes are not themselves counted as requests
    assert API_KEY not in first.text
    again = scrape(json_server.root_url)
    assert total(again, "deepserve_requests_total") == total(a, "deepserve_requests_total")


def total(page: Scrape, name: str) -> float:
    return sum(value for (sample, _), value in page.samples.items() if sample == name)


def test_a_running_stream_shows_in_the_engine_gauges(json_server):
    model = json_server.model
    body = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", json_server.base_url + "/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        assert '"role":"assistant"' in next(events)  # sent before the engine produced anything
        assert '"content"' in next(events)  # a token is out: the sequence is decoding (400 to go)
        during = scrape(json_server.root_url)
    assert during.value("deepserve_num_requests_running", model=model) == 1
    assert during.value("deepserve_requests_in_flight") >= 1
    assert 0 < during.value("deepserve_kv_cache_usage_ratio", model=model) <= 1
    assert during.value("deepserve_kv_cache_cached_tokens", model=model) > 0


def test_a_metrics_key_guards_the_page_when_set():
    running = start_server("--metrics-key", "prom-scrape-token", "--parallel", "1", "--ctx-size", "256")
    try:
        for path in ("/metrics", "/v1/metrics"):
            refused = httpx.get(running.root_url + path, timeout=30)
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "authentication_error"
            assert httpx.get(running.root_url + path, headers={"Authorization": "Bearer nope"},
                             timeout=30).status_code == 401
            ok = scrape(running.root_url, path, Authorization="Bearer prom-scrape-token")
            assert "deepserve_requests" in ok.families
    finally:
        running.stop()


def test_upstream_health_api_sets_one_series_without_credentials():
    from prometheus_client import generate_latest

    from deepserve.observability import metrics

    metrics.set_upstream_health("m-test", "http://user:secret@10.0.0.5:8000/v1?token=abc", True)
    metrics.set_upstream_health("m-test", "http://user:secret@10.0.0.5:8000/v1?token=abc", False)
    page = Scrape(generate_latest(metrics.REGISTRY).decode())
    assert page.value("deepserve_upstream_up", model="m-test", upstream="http://10.0.0.5:8000/v1") == 0
    assert "secret" not in page.text and "token=abc" not in page.text
    metrics.forget_upstream("m-test", "http://user:secret@10.0.0.5:8000/v1")
    page = Scrape(generate_latest(metrics.REGISTRY).decode())
    assert not page.has("deepserve_upstream_up", model="m-test", upstream="http://10.0.0.5:8000/v1")
