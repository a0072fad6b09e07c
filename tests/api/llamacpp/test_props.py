"""llama-server's /props and /apply-template on the bundled model, through the real server."""

from __future__ import annotations

import httpx


def test_props_tell_the_window_the_defaults_the_template_and_the_special_tokens(http, server):
    props = http.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 1024  # the test server's --ctx-size
    params = props["default_generation_settings"]["params"]
    assert (params["n_predict"], params["temperature"], params["top_k"], params["top_p"]) == (-1, 0.8, 40, 0.95)
    assert props["total_slots"] == 8 and props["model_alias"] == server.model
    assert props["model_path"].endswith(".gguf")
    assert "<|im_start|>" in props["chat_template"]  # SmolLM2's ChatML template, from the GGUF
    assert props["eos_token"] == "<|im_end|>"
    assert props["modalities"] == {"vision": False, "video": False, "audio": False}


def test_apply_template_gives_the_prompt_a_chat_completion_would_use(http, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = http.post("/apply-template", json={"messages": messages}).json()["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    counted = http.post("/tokenize", json={"model": server.model, "messages": messages}).json()["count"]
    assert http.post("/tokenize", json={"content": prompt, "add_special": False}).json()["count"] == counted
    chat = http.post("/v1/chat/completions", json={"model": server.model, "messages": messages, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == counted


def test_bad_requests_get_llama_servers_error_shape(http, server):
    r = http.post("/apply-template", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] == 400
    refused = httpx.get(server.root_url + "/props", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == 401
