"""Segmind through the real engine and real HTTP: the seed's request, `x-api-key` only, `x-remaining-credits`
on every response, the seed's status codes, and the OpenAI routes under /v1/ left untouched."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from deepserve.api.segmind import render
from deepserve.api.segmind.routes import RESERVED_SLUGS, SLUGS, is_slug_path
from deepserve.errors import EngineError

CREDITS = "x-remaining-credits"
# the seed's own request body
SEED_MESSAGES = [
    {"role": "user", "content": "tell me a joke on cats"},
    {"role": "assistant", "content": "here is a joke about cats..."},
    {"role": "user", "content": "now a joke on dogs"},
]


@pytest.fixture()
def segmind(server) -> httpx.Client:
    with httpx.Client(base_url=server.root_url, headers={"x-api-key": server.api_key}, timeout=120) as c:
        yield c


def assert_segmind_error(r: httpx.Response, status: int, *, caller_known: bool = True) -> str:
    """`caller_known`: the key was looked up (these tests' key is the operator's: no account, so no header);
    else (no key, a bad one, a refusal before the route) the header says "0"."""
    assert r.status_code == status, r.text
    assert r.headers.get(CREDITS) == (None if caller_known and status != 401 else "0")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def test_seed_request_gets_an_openai_chat_completion_and_the_credits_header(segmind):
    r = segmind.post("/v1/deepseek-reasoner", json={"messages": SEED_MESSAGES, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert CREDITS not in r.headers  # the operator's key: no account to count down
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "deepseek-reasoner"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_the_served_model_id_is_a_slug_too_and_gives_the_same_answer(segmind, server):
    body = {"messages": SEED_MESSAGES, "max_tokens": 8, "temperature": 0}
    by_id = segmind.post(f"/v1/{server.model}", json=body).json()
    by_alias = segmind.post("/v1/deepseek-reasoner", json=body).json()
    assert by_id["model"] == server.model
    assert by_id["choices"][0]["message"] == by_alias["choices"][0]["message"]


def test_stream_is_openai_chunks_with_the_credits_header(segmind):
    body = {"messages": SEED_MESSAGES, "max_tokens": 8, "temperature": 0}
    full = segmind.post("/v1/deepseek-reasoner", json=body).json()["choices"][0]["message"]["content"]
    with segmind.stream("POST", "/v1/deepseek-reasoner", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and CREDITS not in r.headers
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full


def test_bearer_is_not_accepted_here(server):
    r = httpx.post(server.root_url + "/v1/deepseek-reasoner", json={"messages": SEED_MESSAGES},
                   headers={"Authorization": f"Bearer {server.api_key}"})
    assert "x-api-key" in assert_segmind_error(r, 401)


def test_wrong_key_is_401(server):
    r = httpx.post(server.root_url + "/v1/deepseek-reasoner", json={"messages": SEED_MESSAGES},
                   headers={"x-api-key": "wrong"})
    assert_segmind_error(r, 401)


def test_key_is_checked_before_the_slug_and_the_slug_before_the_body(server, segmind):
    r = httpx.post(server.root_url + "/v1/no-such-model", json={"messages": []}, headers={"x-api-key": "wrong"})
    assert_segmind_error(r, 401)
    assert_segmind_error(segmind.post("/v1/no-such-model", json={"messages": []}), 404)


def test_unknown_slug_is_404_whatever_the_method(segmind):
    r = segmind.post("/v1/no-such-model", json={"messages": SEED_MESSAGES})
    assert "no-such-model" in assert_segmind_error(r, 404)
    assert_segmind_error(segmind.get("/v1/no-such-model"), 404, caller_known=False)  # before the key: no route


def test_wrong_method_is_405_after_the_key(segmind):
    for method in ("GET", "PUT", "DELETE"):
        r = segmind.request(method, "/v1/deepseek-reasoner")
        assert_segmind_error(r, 405)  # the key was read: the operator's has no account, so no header
        assert r.headers["Allow"] == "POST"
    assert_segmind_error(segmind.get("/v1/deepseek-reasoner", headers={"x-api-key": "ds-bad"}), 401)


@pytest.mark.parametrize(
    "body",
    [{}, {"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
     {"messages": SEED_MESSAGES, "temperature": 2.1}, {"messages": SEED_MESSAGES, "top_p": 0},
     {"messages": SEED_MESSAGES, "max_tokens": 0}],
    ids=["empty", "no-messages", "bad-role", "temperature", "top_p", "max_tokens"],
)
def test_invalid_input_is_400_with_the_header(segmind, body):
    assert_segmind_error(segmind.post("/v1/deepseek-reasoner", json=body), 400)


def test_malformed_json_and_oversized_body_keep_the_envelope(segmind):
    r = segmind.post("/v1/deepseek-reasoner", content=b'{"messages": ', headers={"Content-Type": "application/json"})
    assert "JSON" in assert_segmind_error(r, 400)
    huge = {"messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    # refused on its Content-Length, before any route (or key lookup) runs
    assert_segmind_error(segmind.post("/v1/deepseek-reasoner", json=huge), 413, caller_known=False)


def test_full_queue_is_429_with_the_header(full_queue_server):
    r = httpx.post(full_queue_server.root_url + "/v1/deepseek-reasoner",
                   json={"messages": SEED_MESSAGES, "max_tokens": 1},
                   headers={"x-api-key": full_queue_server.api_key}, timeout=60)
    assert_segmind_error(r, 429)


def test_server_error_is_500_with_the_header():
    response = render.error_response(EngineError("The engine failed while generating: boom"))
    assert response.status_code == 500 and response.headers[CREDITS] == "0"
    assert json.loads(response.body) == {"error": "The engine failed while generating: boom"}
    assert render.NOT_ENOUGH_CREDITS == 406


# ---- the OpenAI routes under /v1/ are never taken by the slug route -----------------------------------


def test_slug_registry_never_shadows_openai():
    assert not set(SLUGS) & RESERVED_SLUGS
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/health/live", "/v1/health/ready",
                 "/v1/models/x", "/v1/embeddings"):
        assert not is_slug_path(path), path
    assert is_slug_path("/v1/deepseek-reasoner") and is_slug_path("/v1/models2")


def test_openai_routes_still_answer_as_openai(http, server):
    listing = http.get("/v1/models")
    assert listing.status_code == 200 and listing.json()["object"] == "list" and CREDITS not in listing.headers
    assert http.get(f"/v1/models/{server.model}").json()["id"] == server.model
    assert http.get("/v1/health/live").json()["object"] == "health.response"
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    chat = client.chat.completions.create(model=server.model, messages=SEED_MESSAGES, max_tokens=2)
    assert chat.object == "chat.completion"
    completion = client.completions.create(model=server.model, prompt="Hi", max_tokens=2)
    assert completion.object == "text_completion"


@pytest.mark.parametrize(
    "method,path,status",
    [("GET", "/v1/chat/completions", 405), ("GET", "/v1/completions", 405), ("POST", "/v1/models", 405),
     ("DELETE", "/v1/models", 405), ("POST", "/v1/health/live", 405), ("POST", "/v1/embeddings", 404)],
)
def test_openai_paths_keep_openai_errors(http, method, path, status):
    r = http.request(method, path, json={})
    assert r.status_code == status
    error = r.json()["error"]
    assert isinstance(error, dict) and error["type"] and error["message"]
    assert CREDITS not in r.headers


def test_openapi_documents_the_slug_route(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert list(paths["/v1/{slug}"]) == ["post"]  # the wrong-method catch-all is not documented


class _Served:
    """Just what find_model reads of a ServedModel."""

    def __init__(self, model_id: str, catalog_id: str | None):
        from deepserve.catalog import default_catalog
        self.model_id = model_id
        self.catalog = default_catalog().find(catalog_id) if catalog_id else None


class _Registry:
    def __init__(self, *models: _Served):
        self._models = list(models)

    def get(self, model_id: str):
        from deepserve.errors import ModelNotFoundError
        for model in self._models:
            if model.model_id == model_id:
                return model
        raise ModelNotFoundError(f"no {model_id}")

    def __iter__(self):
        return iter(self._models)


def test_deepseek_reasoner_is_the_served_model_closest_to_r1_whatever_the_load_order():
    from deepserve.api.segmind.routes import find_model
    plain = _Served("SmolLM2-135M-Instruct", None)
    distill = _Served("deepseek-r1-8b", "deepseek-r1-8b")
    assert distill.catalog is not None and distill.catalog.reasoning
    assert find_model(_Registry(plain, distill), "deepseek-reasoner") is distill
    assert find_model(_Registry(distill, plain), "deepseek-reasoner") is distill
    assert find_model(_Registry(plain), "deepseek-reasoner") is plain  # nothing closer: the model served
