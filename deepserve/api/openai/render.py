"""OpenAI response bodies and stream chunks, as plain dicts (built on the hot path: no pydantic)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from deepserve.engine.types import FinishReason, TokenDelta, TokenLogprob, ToolCall
from deepserve.serving import ChoiceResult


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(reason: FinishReason | None) -> str | None:
    """Internal finish reasons as OpenAI names them. Errors are reported as errors, not as a reason."""
    if reason is None:
        return None
    if reason in (FinishReason.LENGTH, FinishReason.TOOL_CALLS):
        return reason.value
    return "stop"


def usage(groups: list[list[ChoiceResult]]) -> dict[str, Any]:
    """Usage of a response. Each group is the choices of one prompt: a prompt counts once, as OpenAI
    counts it for n > 1; every choice's output counts."""
    num_prompt = sum(g[0].num_prompt_tokens for g in groups if g)
    num_cached = sum(max(c.num_cached_tokens for c in g) for g in groups if g)
    num_generated = sum(c.num_generated_tokens for g in groups for c in g)
    num_reasoning = sum(c.num_reasoning_tokens for g in groups for c in g)
    return usage_counts(num_prompt, num_cached, num_generated, num_reasoning)


def usage_counts(num_prompt: int, num_cached: int, num_generated: int, num_reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_generated,  # reasoning included, whatever the reasoning_format
        "total_tokens": num_prompt + num_generated,
        "prompt_tokens_details": {"cached_tokens": num_cached},
        "completion_tokens_details": {"reasoning_tokens": num_reasoning},
        # DeepSeek's own names for the same prompt-cache figures
        "prompt_cache_hit_tokens": num_cached,
        "prompt_cache_miss_tokens": num_prompt - num_cached,
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token_bytes),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[TokenLogprob], text_offset_start: int,
                        prompt_entries: list[TokenLogprob] | None = None) -> dict[str, Any]:
    """Legacy completions' logprobs. `prompt_entries` (echo): the prompt's tokens lead, from offset 0, the first
    with null logprob and alternatives (OpenAI's and vLLM's shape); the output's start at `text_offset_start`."""
    offsets, at = [], 0
    for e in prompt_entries or ():
        offsets.append(at)
        at += len(e.token)
    at = text_offset_start
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    every = [*(prompt_entries or ()), *entries]
    return {
        "tokens": [e.token for e in every],
        "token_logprobs": [e.logprob for e in every],
        "top_logprobs": [None if e.logprob is None else {t: lp for t, _, lp in e.top} for e in every],
        "text_offset": offsets,
    }


def tool_calls(calls: list[ToolCall], *, streaming: bool = False) -> list[dict[str, Any]]:
    """OpenAI tool calls (a stream sends each whole call in one delta, with its index)."""
    return [
        {**({"index": c.index} if streaming else {}), "id": c.id, "type": "function",
         "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def chat_message(choice: ChoiceResult) -> dict[str, Any]:
    """The assistant message: content, the reasoning (deepseek format: as `reasoning_content` and `reasoning`,
    the names DeepSeek's API and newer clients read), and tool calls."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.reasoning_text:
        message["reasoning_content"] = message["reasoning"] = choice.reasoning_text
    if choice.tool_calls:
        message["tool_calls"] = tool_calls(choice.tool_calls)
        if not choice.text.strip():
            message["content"] = None
    return message


def chat_delta(delta: TokenDelta) -> dict[str, Any]:
    """The `delta` of a stream chunk for one engine delta: reasoning, content and tool calls it carries."""
    out: dict[str, Any] = {}
    if delta.reasoning_text:
        out["reasoning_content"] = out["reasoning"] = delta.reasoning_text
    if delta.text:
        out["content"] = delta.text
    if delta.tool_calls:
        out["tool_calls"] = tool_calls(delta.tool_calls, streaming=True)
    return out


def chat_completion(response_id: str, model: str, choices: list[ChoiceResult], want_logprobs: bool) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": chat_message(c),
                "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
                "finish_reason": finish_reason(c.finish_reason),
                "stop_reason": c.stop_reason,
            }
            for c in choices
        ],
        "usage": usage([choices]),
    }


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    *,
    finish: str | None = None,
    stop_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}
        ],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def text_completion(
    response_id: str, model: str, choices: list[ChoiceResult], *, prefixes: list[str], want_logprobs: bool,
    usage_body: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": prefixes[i] + c.text,
                "logprobs": (completion_logprobs(c.logprobs, len(prefixes[i]), c.prompt_logprobs if prefixes[i] else None)
                             if want_logprobs else None),
                "finish_reason": finish_reason(c.finish_reason),
                "stop_reason": c.stop_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_body,
    }


def completion_chunk(
    response_id: str, created: int, model: str, index: int, text: str, *,
    finish: str | None = None, stop_reason: str | None = None, logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def error_body(message: str, error_type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
