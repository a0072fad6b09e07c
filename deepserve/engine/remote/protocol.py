"""The OpenAI wire protocol as an upstream client speaks it: request bodies out, stream chunks in.

`request_body()` turns one GenerateRequest into the JSON body of `/v1/chat/completions` (a chat) or
`/v1/completions` (a raw prompt, text or token ids), always streamed with `stream_options.include_usage`.
`StreamTranslator` turns the upstream's chunks into TokenDeltas the way the in-process engine produces them:
reasoning (`reasoning_content`, or `reasoning` as newer vLLM names it) in the request's reasoning format,
tool-call fragments assembled into whole calls, logprobs, and one last delta with the upstream's `usage`.
Pure functions and plain state: no I/O, unit-tested with recorded chunks.
"""

from __future__ import annotations

import json
from typing import Any

from deepserve.engine.types import (
    FinishReason, GenerateRequest, Generation, ReasoningFormat, TextPrompt, TokenDelta, TokenLogprob, ToolCall,
)

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "tool_calls": FinishReason.TOOL_CALLS,
           "function_call": FinishReason.TOOL_CALLS, "abort": FinishReason.ABORT}
THINK_OPEN, THINK_CLOSE = "<think>\n", "</think>\n\n"  # the raw format, as the in-process engine writes it


class UpstreamProtocolError(Exception):
    """The upstream answered something that is not an OpenAI stream (or ended it without usage)."""


def is_chat(prompt: TextPrompt | list[int]) -> bool:
    return isinstance(prompt, TextPrompt) and prompt.messages is not None


def request_body(request: GenerateRequest, upstream_model: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    prompt = request.prompt_tokens
    s = request.sampling
    body: dict[str, Any] = {
        "model": upstream_model,
        "stream": True,
        # continuous_usage_stats (vLLM, SGLang): running counts in every chunk, so a stream cut short is
        # charged from the upstream's numbers; servers that do not know it ignore it.
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "n": 1,  # n choices are n requests (deepserve.serving.generate), each routed on its own
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.top_k > 0:
        body["top_k"] = s.top_k
    if s.min_p > 0:
        body["min_p"] = s.min_p
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.logit_bias:  # token ids of the upstream's vocabulary: it checks them
        body["logit_bias"] = {str(token): bias for token, bias in s.logit_bias.items()}
    if is_chat(prompt):
        assert isinstance(prompt, TextPrompt)
        body["messages"] = prompt.messages
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            value = getattr(prompt, name)
            if value is not None:
                body[name] = value
        # vLLM's and SGLang's fields (deepserve reads them too; DeepSeek reads the last message's "prefix";
        # llama-server continues a last assistant message by itself).
        if prompt.generation is Generation.CONTINUE:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        elif prompt.generation is Generation.NONE:
            body["add_generation_prompt"] = False
        if s.response_format is not None:
            body["response_format"] = s.response_format
        if s.reasoning is not None:
            # The reasoning apart from the answer, whatever the client asked: the translator restyles it.
            # (deepserve and llama-server read this; vLLM and SGLang separate it with --reasoning-parser.)
            body["reasoning_format"] = "deepseek"
        if s.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = s.top_logprobs
    else:
        body["prompt"] = prompt.text if isinstance(prompt, TextPrompt) else list(prompt)
        if s.logprobs:
            body["logprobs"] = s.top_logprobs
        if s.response_format is not None:
            body["response_format"] = s.response_format
    if extra:
        body.update(extra)  # operator's per-model extras (models.yaml `extra_body`)
    return body


class StreamTranslator:
    """One upstream stream → TokenDeltas. Feed it each `data:` payload; `done()` gives the last delta."""

    def __init__(self, request: GenerateRequest):
        self._reasoning = request.sampling.reasoning
        self._chat = is_chat(request.prompt_tokens)
        self.num_delivered = 0  # generated tokens handed on so far (the upstream's running count when it sends one)
        self.num_prompt: int | None = None  # the upstream's prompt count, once it has said it
        self._usage: dict[str, Any] | None = None
        self._finish: FinishReason | None = None
        self._stop_reason: str | None = None
        self._tool_parts: dict[int, dict[str, Any]] = {}
        self._in_reasoning = False  # raw format: a <think> block is open
        self.delivered_output = False  # any text, reasoning or tool call left (failover is over after that)

    def feed(self, payload: str) -> TokenDelta | None:
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise UpstreamProtocolError(f"the upstream sent a stream event that is not JSON: {exc}") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError("the upstream sent a stream event that is not a JSON object")
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise UpstreamProtocolError(f"the upstream reported an error: {message}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
            if usage.get("prompt_tokens"):
                self.num_prompt = int(usage["prompt_tokens"])
        choices = chunk.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        delta, has_output = self._choice_delta(choice)
        reason = choice.get("finish_reason")
        if reason:
            self._finish = _FINISH.get(reason, FinishReason.STOP)
            stop_reason = choice.get("stop_reason")
            self._stop_reason = stop_reason if isinstance(stop_reason, str) else None
        if not has_output:  # a role-only chunk, or the finish: nothing generated travels in it
            return None
        # Tokens in this chunk: the upstream's running count when it sends one, else its logprobs entries, else
        # one (every chunk carries at least one token: counting so never charges more than was delivered).
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            count = max(0, int(usage["completion_tokens"]) - self.num_delivered)
        else:
            count = len(delta.logprobs) or 1
        delta.token_count = count
        self.num_delivered += count
        self.delivered_output = True
        if self.num_prompt is not None:
            delta.num_prompt_tokens = self.num_prompt  # lets billing charge the prompt of a stream cut short
        return delta

    def _choice_delta(self, choice: dict[str, Any]) -> tuple[TokenDelta, bool]:
        """The delta of one chunk, and whether the chunk carried generated output (even output the reasoning
        format hides: it was generated, so it counts)."""
        out = TokenDelta()
        if not self._chat:
            out.text = choice.get("text") or ""
            out.logprobs = completion_logprobs(choice.get("logprobs"))
            return out, bool(out.text or out.logprobs)
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        content = delta.get("content") or ""
        tool_parts = delta.get("tool_calls") or []
        fmt = self._reasoning.format if self._reasoning is not None else ReasoningFormat.DEEPSEEK
        if reasoning:
            if fmt == ReasoningFormat.DEEPSEEK:
                out.reasoning_text = reasoning
            elif fmt == ReasoningFormat.RAW:
                out.text = (THINK_OPEN if not self._in_reasoning else "") + reasoning
                self._in_reasoning = True
        if content:
            if self._in_reasoning:
                out.text += THINK_CLOSE
                self._in_reasoning = False
            out.text += content
        for part in tool_parts:
            index = int(part.get("index", len(self._tool_parts)))
            call = self._tool_parts.setdefault(index, {"id": "", "name": "", "arguments": ""})
            call["id"] = part.get("id") or call["id"]
            function = part.get("function") or {}
            call["name"] += function.get("name") or ""
            arguments = function.get("arguments")
            call["arguments"] += arguments if isinstance(arguments, str) else json.dumps(arguments) if arguments else ""
        out.logprobs = chat_logprobs(choice.get("logprobs"))
        return out, bool(reasoning or content or tool_parts or out.logprobs)

    def done(self) -> TokenDelta:
        """The last delta, at the upstream's `[DONE]`: the finish reason, whole tool calls and the usage."""
        if self._usage is None or self._usage.get("completion_tokens") is None:
            raise UpstreamProtocolError(
                "the upstream ended its stream without a usage report (it must support stream_options.include_usage)")
        if self._finish is None:
            raise UpstreamProtocolError("the upstream ended its stream without a finish_reason")
        usage = self._usage
        final = TokenDelta(finish_reason=self._finish, stop_reason=self._stop_reason)
        final.tool_calls = [ToolCall(id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"] or "{}",
                                     index=i) for i, c in enumerate(self._tool_parts[k] for k in sorted(self._tool_parts))]
        final.num_prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        final.num_cached_tokens = int(details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0)
        final.num_generated_tokens = int(usage["completion_tokens"])
        reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
        final.num_reasoning_tokens = int(reasoning or 0)
        final.token_count = max(0, final.num_generated_tokens - self.num_delivered)
        return final

    def failed(self, reason: str) -> TokenDelta:
        """The last delta of a stream the upstream broke after output had left: an error, with what was
        delivered (billing charges that and no more: the prompt only if the upstream had counted it)."""
        return TokenDelta(
            finish_reason=FinishReason.ERROR, error=reason, num_prompt_tokens=self.num_prompt or 0,
            num_generated_tokens=self.num_delivered, token_count=0,
        )


def chat_logprobs(body: Any) -> list[TokenLogprob]:
    if not isinstance(body, dict):
        return []
    out = []
    for entry in body.get("content") or []:
        token = entry.get("token", "")
        top = [(t.get("token", ""), _bytes(t), float(t.get("logprob", 0.0))) for t in entry.get("top_logprobs") or []]
        out.append(TokenLogprob(token, _bytes(entry), float(entry.get("logprob", 0.0)), top))
    return out


def completion_logprobs(body: Any) -> list[TokenLogprob]:
    if not isinstance(body, dict):
        return []
    if "content" in body and "tokens" not in body:  # llama-server answers /v1/completions in the chat shape
        return chat_logprobs(body)
    tokens = body.get("tokens") or []
    values = body.get("token_logprobs") or []
    tops = body.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(TokenLogprob(token, token.encode(), float(values[i] if i < len(values) and values[i] is not None
                                                              else 0.0),
                                [(t, t.encode(), float(lp)) for t, lp in top.items()]))
    return out


def _bytes(entry: dict[str, Any]) -> bytes:
    raw = entry.get("bytes")
    return bytes(raw) if isinstance(raw, list) else str(entry.get("token", "")).encode()
