"""Dataoorts serverless through the real engine and real HTTP: the seed's own `requests` example, then every
error status and the edges of every range."""

from __future__ import annotations

import json

import httpx
import pytest

from deepserve.api.dataoorts import render
from deepserve.api.dataoorts.schemas import DataoortsData
from deepserve.errors import EngineError

MESSAGES = [{"role": "user", "content": "What is Deep Learning"}]


def seed_example(url: str, api_key: str, model: str) -> None:
    """Seed 000's Python example, verbatim but for the URL, the key and the model."""
    import requests
    import json

    # Define the endpoint URL
    url = url

    # Define the headers including the API Authorization token
    headers = {
        'Content-Type': 'application/json',
        'Authorization': f'Bearer {api_key}'
    }

    # Define the Model Name and Data Payload with additional parameters
    payload = {
        "model": model,
        "data": {
            "messages": [
                {"role": "system", "content": "You are an expert deep learning engineer"},
                {"role": "user", "content": "What is Deep Learning"}
            ],
            # Additional hyper-parameters for fine-tuning the output (optional):
            "temperature": 0.1,
            "top_p": 0.9,
            "top_k": 40,
            "max_tokens": 512
        }
    }

    # Make the POST request
    response = requests.post(url, headers=headers, data=json.dumps(payload))
    # Parse and print the JSON response with pretty formatting
    response_json = response.json()
    print(json.dumps(response_json, indent=4))


def test_the_seed_example_runs_unchanged_and_gets_the_documented_envelope(server, capsys):
    seed_example(server.root_url + "/api/v1", server.api_key, server.model)
    body = json.loads(capsys.readouterr().out)
    assert list(body) == ["errors", "messages", "result", "success"]  # the seed's key order
    assert body["errors"] == [] and body["messages"] == [] and body["success"] is True
    result = body["result"]
    assert set(result) == {"response", "usage"}
    assert isinstance(result["response"], str) and len(result["response"].split()) >= 3
    usage = result["usage"]
    # the seed's keys in its (alphabetical) order, plus the reasoning count every dialect's usage carries
    assert list(usage) == ["completion_tokens", "completion_tokens_details", "prompt_tokens", "total_tokens"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert usage["prompt_tokens"] > 12 and 0 < usage["completion_tokens"] <= 512
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def post(http: httpx.Client, model: str, **data) -> httpx.Response:
    return http.post("/api/v1", json={"model": model, "data": {"messages": MESSAGES, **data}})


def assert_failure(r: httpx.Response, status: int) -> list[str]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["result"] is None and body["messages"] == []
    assert body["errors"] and all(isinstance(e, str) and e for e in body["errors"])
    return body["errors"]


def test_max_tokens_and_seed_are_honoured(http, server):
    first = post(http, server.model, max_tokens=6, temperature=1.2, seed=77).json()["result"]
    again = post(http, server.model, max_tokens=6, temperature=1.2, seed=77).json()["result"]
    assert first == again and first["usage"]["completion_tokens"] <= 6


def test_defaults_are_the_seeds():
    sampling = DataoortsData(messages=MESSAGES).to_sampling()
    assert sampling.temperature == 0.6 and sampling.top_p == 1.0 and sampling.top_k == 0
    assert DataoortsData(messages=MESSAGES, top_p=2).to_sampling().top_p == 1.0  # 1–2: no cut-off


EDGES = [
    ("temperature", 0, 5, [-0.1, 5.1]),
    ("top_p", 0, 2, [-0.1, 2.1]),
    ("top_k", 1, 50, [0, 51]),
    ("seed", 1, 9_999_999_999, [0, 10_000_000_000]),
    ("repetition_penalty", 0, 2, [-0.1, 2.1]),
    ("frequency_penalty", 0, 2, [-0.1, 2.1]),
    ("presence_penalty", 0, 2, [-0.1, 2.1]),
]


@pytest.mark.parametrize("field,low,high,outside", EDGES, ids=[e[0] for e in EDGES])
def test_range_edges_are_accepted_and_just_outside_is_400_naming_field_and_range(
    http, server, field, low, high, outside
):
    for value in (low, high):
        r = post(http, server.model, max_tokens=1, **{field: value})
        assert r.status_code == 200, (field, value, r.text)
        assert r.json()["result"]["usage"]["completion_tokens"] == 1
    for value in outside:
        (error,) = assert_failure(post(http, server.model, max_tokens=1, **{field: value}), 400)
        assert error.startswith(f"data.{field}:") and f"between {low} and {high}" in error


def test_every_invalid_field_is_its_own_error(http, server):
    errors = assert_failure(post(http, server.model, temperature=9, top_k=99, seed=0), 400)
    assert len(errors) == 3
    assert {e.split(":")[0] for e in errors} == {"data.temperature", "data.top_k", "data.seed"}


@pytest.mark.parametrize(
    "payload",
    [{"data": {"messages": MESSAGES}}, {"model": "m"}, {"model": "m", "data": {"messages": []}},
     {"model": "m", "data": {"messages": [{"role": "user"}]}}],
    ids=["no-model", "no-data", "no-messages", "no-content"],
)
def test_missing_pieces_are_400(http, payload):
    assert_failure(http.post("/api/v1", json=payload), 400)


def test_malformed_json_is_400(http):
    r = http.post("/api/v1", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert "JSON" in assert_failure(r, 400)[0]


def test_a_message_over_4096_characters_is_fine_when_it_fits_the_context(http, server):
    """Cloudflare caps each message at 4,096 characters; Dataoorts documents only the context window."""
    text = ("The quick brown fox jumps over the lazy dog. " * 100)[:4200]
    r = http.post("/api/v1", json={"model": server.model,
                                    "data": {"messages": [{"role": "user", "content": text}], "max_tokens": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["usage"]["prompt_tokens"] > 800


def test_missing_and_wrong_key_are_401(server):
    url = server.root_url + "/api/v1"
    body = {"model": server.model, "data": {"messages": MESSAGES}}
    assert "API key" in assert_failure(httpx.post(url, json=body), 401)[0]
    assert "API key" in assert_failure(httpx.post(url, json=body, headers={"Authorization": "Bearer x"}), 401)[0]


def test_unknown_model_is_404_naming_the_served_ones(http, server):
    (error,) = assert_failure(post(http, "deepseek-ai/no-such-model"), 404)
    assert "deepseek-ai/no-such-model" in error and server.model in error


def test_body_over_the_limit_is_413(http, server):
    assert_failure(post(http, server.model, note="x" * (5 * 1024 * 1024)), 413)


def test_full_queue_is_429(full_queue_server):
    r = httpx.post(
        full_queue_server.root_url + "/api/v1",
        json={"model": full_queue_server.model, "data": {"messages": MESSAGES, "max_tokens": 1}},
        headers={"Authorization": f"Bearer {full_queue_server.api_key}"}, timeout=60,
    )
    assert "busy" in assert_failure(r, 429)[0]
    assert int(r.headers["Retry-After"]) >= 1


def test_wrong_method_is_405_in_dataoorts_envelope(http):
    assert_failure(http.get("/api/v1"), 405)


def test_engine_failure_is_500():
    response = render.error_response(EngineError("The engine failed while generating: boom"))
    body = json.loads(response.body)
    assert response.status_code == 500 and body["success"] is False and body["errors"][0].endswith("boom")


def test_openapi_documents_the_route(http):
    assert "requestBody" in http.get("/openapi.json").json()["paths"]["/api/v1"]["post"]
