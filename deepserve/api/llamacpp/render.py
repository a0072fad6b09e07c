"""llama-server's answers: the final result, stream events, token probabilities, timings and errors
(tools/server/server-task.cpp to_json_non_oaicompat, server-common.cpp format_error_response)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from deepserve.engine.types import FinishReason, TokenLogprob
from deepserve.errors import DeepserveError
from deepserve.serving import ChoiceResult

NO_SLOT = -1  # deepserve has no fixed slot per request to name


@dataclass
class Timings:
    """When the prompt was sent, its first token came and the last one did (llama-server's `timings`)."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None

    def saw_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def to_json(self, choice: ChoiceResult) -> dict[str, Any]:
        finished = self.finished or time.perf_counter()
        first = self.first_token or finished
        prompt_n = max(0, choice.num_prompt_tokens - choice.num_cached_tokens)
        predicted_n = choice.num_generated_tokens
        prompt_ms, predicted_ms = (first - self.started) * 1000, (finished - first) * 1000
        return {
            "cache_n": choice.num_cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
            "predicted_n": predicted_n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0,
        }


def probabilities(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{
        "id": e.token_id, "token": e.token, "bytes": list(e.token_bytes), "logprob": e.logprob,
        "top_logprobs": [{"id": tid, "token": t, "bytes": list(b), "logprob": lp}
                         for tid, (t, b, lp) in zip(e.top_ids or [None] * len(e.top), e.top)],
    } for e in entries]


def stop_type(choice: ChoiceResult) -> str:
    if choice.finish_reason == FinishReason.LENGTH:
        return "limit"
    if choice.finish_reason == FinishReason.STOP:
        return "word" if choice.stop_reason else "eos"
    return "none"


def final_result(choice: ChoiceResult, *, model: str, prompt: str, timings: Timings, settings: dict[str, Any],
                 streamed: bool, return_tokens: bool, want_probs: bool, truncated: bool = False) -> dict[str, Any]:
    """The last answer: the whole text (none of it when it was streamed, as llama-server sends it)."""
    result = {
        "index": 0,
        "content": "" if streamed else choice.text,
        "tokens": choice.token_ids if return_tokens and not streamed else [],
        "id_slot": NO_SLOT,
        "stop": True,
        "model": model,
        "tokens_predicted": choice.num_generated_tokens,
        "tokens_evaluated": choice.num_prompt_tokens,
        "generation_settings": settings,
        "prompt": prompt,
        "has_new_line": "\n" in choice.text,
        "truncated": truncated,  # the window ended the answer before n_predict did
        "stop_type": stop_type(choice),
        "stopping_word": choice.stop_reason or "",
        # what the KV holds: the prompt and the output but its last token, which was never fed back
        "tokens_cached": choice.num_prompt_tokens + max(0, choice.num_generated_tokens - 1),
        "timings": timings.to_json(choice),
    }
    if want_probs and not streamed:
        result["completion_probabilities"] = probabilities(choice.logprobs)
    return result


def pick_fields(result: dict[str, Any], paths: list[str] | None) -> dict[str, Any]:
    """llama-server's response_fields: only these ("timings/prompt_n" reaches into objects), flat."""
    if not paths:
        return result
    picked: dict[str, Any] = {}
    for path in paths:
        value: Any = result
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            picked[path] = value
    return picked


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": kind}}


def error_response(error: DeepserveError, request: Request | None = None) -> Response:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            503: "unavailable_error"}.get(error.status_code, error.error_type)
    body = error_body(error.status_code, error.message, kind)
    if error.code == "context_length_exceeded":
        body["error"]["type"] = "exceed_context_size_error"
        if getattr(error, "ctx_size", None) is not None:  # llama-server's numbers, which its web UI shows
            body["error"].update(n_prompt_tokens=error.num_prompt_tokens, n_ctx=error.ctx_size)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)
