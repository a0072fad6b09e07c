"""ObservedStream alone, on scripted deltas: the cases a local-engine server cannot produce (an upstream engine's
text deltas, which carry a token count and no token ids)."""

from __future__ import annotations

import asyncio

from deepserve.engine.types import FinishReason, TokenDelta, count_choices
from deepserve.observability import metrics
from deepserve.observability.requests import ObservedStream, RequestRecord


async def _deltas(deltas: list[TokenDelta]):
    for delta in deltas:
        yield 0, delta


def _sample(name: str, model: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"model": model, "dialect": "openai"}) or 0.0


def test_upstream_text_deltas_count_as_tokens_and_time_the_first_one():
    model = "observed-upstream"
    record = RequestRecord(request_id="r", method="POST", path="/v1/chat/completions", dialect="openai", model=model)
    deltas = [TokenDelta(text="Hel", token_count=2), TokenDelta(text="lo", token_count=1),
              TokenDelta(text="!", token_count=1, finish_reason=FinishReason.STOP, num_prompt_tokens=9,
                         num_generated_tokens=4)]

    async def consume():
        stream = ObservedStream(_deltas(deltas), record, num_prompt=0, n=1)
        async for _ in stream:
            pass
        await stream.aclose()

    asyncio.run(consume())
    assert record.first_token_at is not None
    assert (record.tokens.num_prompt, record.tokens.num_completion, record.finish_reasons) == (9, 4, ["stop"])
    assert _sample("deepserve_time_to_first_token_seconds_count", model) == 1
    assert _sample("deepserve_inter_token_latency_seconds_count", model) == 2  # 1 then 1 token after the first delta


def test_count_choices_prefers_final_counts_and_counts_the_prompt_once():
    class Choice:
        def __init__(self, final, num_delivered):
            self.final, self.num_delivered = final, num_delivered

    done = TokenDelta(finish_reason=FinishReason.STOP, num_prompt_tokens=12, num_cached_tokens=8,
                      num_generated_tokens=5, num_reasoning_tokens=2)
    counts = count_choices(30, [Choice(done, 3), Choice(None, 4)])  # one finished, one cut off after 4 tokens
    assert (counts.num_prompt, counts.num_cached, counts.num_completion, counts.num_reasoning) == (12, 8, 9, 2)
    cut = count_choices(30, [Choice(None, 4)])  # nothing finished: the prompt as sent, what was delivered
    assert (cut.num_prompt, cut.num_cached, cut.num_completion, cut.num_reasoning) == (30, 0, 4, 0)


def test_each_path_is_labelled_with_its_dialect():
    from deepserve.observability.requests import dialect_of

    cases = {"/v1/chat/completions": "openai", "/chat/completions": "openai", "/completion": "llamacpp",
             "/infill": "llamacpp", "/props": "llamacpp", "/apply-template": "llamacpp",
             "/client/v4/accounts/a/ai/run/@cf/x": "workers_ai", "/api/v1": "dataoorts",
             "/v1/deepseek-reasoner": "segmind", "/admin/keys": "admin"}
    assert {path: dialect_of(path) for path in cases} == cases
