"""Reasoning, grammars and tool calls through the real engine, on the tiny random-weight R1 models
(tests/tiny_gguf.py: `<think>` / `</think>` are tokens of their vocabulary; R1's template opens the block).

Random weights write noise, so behaviour is forced: greedy decoding (deterministic), `ignore_eos`, the
reasoning budget (the engine closes the block itself) and grammars. Where a test relies on the noise not
containing `</think>` by chance, it says so with an assertion.
"""

from __future__ import annotations

import codecs

import asyncio
import json

import jsonschema
import pytest

from deepserve.engine.llamacpp.loop import LlamaCppEngine
from deepserve.engine.types import (
    FinishReason,
    GenerateRequest,
    ReasoningFormat,
    ReasoningParams,
    SamplingParams,
    TokenDelta,
)
from deepserve.reasoning import FORCED_CLOSE
from deepserve.structured import schema_grammar
from deepserve.templates.chat import ChatTemplate, builtin_template
from deepserve.tools import CALLS_BEGIN, DEEPSEEK, MARKERS, SEP, check_tools, tool_call_grammar

MESSAGES = [{"role": "user", "content": "What is two plus two?"}]
SMALL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
                "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def r1_engine(tiny_ggufs):
    engine = LlamaCppEngine(tiny_ggufs["deepseek-r1-distill-qwen"], "tiny-r1", ctx_size=256, parallel=4,
                            batch_size=64, threads=1)
    yield engine
    engine.close()


def chat_prompt(engine: LlamaCppEngine, messages=MESSAGES) -> list[int]:
    runner = engine.runner
    template = ChatTemplate(builtin_template("deepseek-r1"), bos_token=runner.token_text(runner.bos_token_id),
                            eos_token=runner.token_text(runner.eos_token_id))
    text = template.render(messages)
    assert text.endswith("<｜Assistant｜><think>\n")  # R1's template opens the block: no tag in the output
    return runner.tokenize(text, add_special=False, parse_special=True)


def generate(engine: LlamaCppEngine, prompt: list[int], **sampling) -> list[TokenDelta]:
    params = SamplingParams(**{"temperature": 0.0, "ignore_eos": True, **sampling})

    async def run():
        return [d async for d in engine.submit(GenerateRequest(prompt, params))]

    return asyncio.run(run())


def tokens_of(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def close_tokens(engine: LlamaCppEngine) -> list[int]:
    return engine.runner.tokenize(FORCED_CLOSE, add_special=False, parse_special=True)


def think_close_id(engine: LlamaCppEngine) -> int:
    (token,) = engine.runner.tokenize("</think>", add_special=False, parse_special=True)
    return token


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_a_budget_of_n_gives_exactly_n_reasoning_tokens_then_the_close_then_the_answer(r1_engine, budget):
    prompt = chat_prompt(r1_engine)
    close = close_tokens(r1_engine)
    assert close[0] == think_close_id(r1_engine) and len(close) == 2  # "</think>" is one token, then "\n\n"
    num_answer = 6
    deltas = generate(r1_engine, prompt, max_tokens=budget + len(close) + num_answer,
                      reasoning=ReasoningParams(budget=budget))
    tokens = tokens_of(deltas)
    assert think_close_id(r1_engine) not in tokens[:budget]  # the noise did not close the block by itself
    assert tokens[budget: budget + len(close)] == close
    final = deltas[-1]
    assert final.finish_reason == FinishReason.LENGTH
    assert final.num_reasoning_tokens == budget and final.num_generated_tokens == len(tokens)
    # streaming order: every reasoning delta comes before the first content delta
    kinds = ["r" if d.reasoning_text else "c" for d in deltas if d.reasoning_text or d.text]
    assert kinds == sorted(kinds, key="rc".index) and "c" in kinds
    answer = "".join(d.text for d in deltas)
    pieces = b"".join(r1_engine.runner.token_piece(t) for t in tokens[budget + len(close):])
    assert answer == codecs.getincrementaldecoder("utf-8")("replace").decode(pieces).lstrip()  # the answer is what followed the close


def test_max_tokens_inside_the_reasoning_is_length_with_no_answer(r1_engine):
    prompt = chat_prompt(r1_engine)
    for fmt in ReasoningFormat:
        deltas = generate(r1_engine, prompt, max_tokens=7, reasoning=ReasoningParams(format=fmt))
        tokens = tokens_of(deltas)
        assert think_close_id(r1_engine) not in tokens
        final = deltas[-1]
        assert final.finish_reason == FinishReason.LENGTH and final.num_reasoning_tokens == 7
        content = "".join(d.text for d in deltas)
        if fmt == ReasoningFormat.RAW:  # the unfinished block, marked as such, never a bare half-thought
            assert content.startswith("<think>\n") and "</think>" not in content
        else:
            assert content == ""
        assert ("".join(d.reasoning_text for d in deltas) != "") == (fmt == ReasoningFormat.DEEPSEEK)


def test_the_three_styles_of_one_generation(r1_engine):
    prompt = chat_prompt(r1_engine)
    out = {}
    for fmt in ReasoningFormat:
        deltas = generate(r1_engine, prompt, max_tokens=14, reasoning=ReasoningParams(format=fmt, budget=4))
        out[fmt] = ("".join(d.reasoning_text for d in deltas), "".join(d.text for d in deltas), tokens_of(deltas),
                    deltas[-1].num_reasoning_tokens)
    assert out[ReasoningFormat.DEEPSEEK][2] == out[ReasoningFormat.RAW][2] == out[ReasoningFormat.HIDDEN][2]
    assert {v[3] for v in out.values()} == {4}
    reasoning, answer = out[ReasoningFormat.DEEPSEEK][:2]
    raw = out[ReasoningFormat.RAW][1]
    assert out[ReasoningFormat.RAW][0] == "" and raw.startswith("<think>\n") and raw.count("</think>") == 1
    raw_reasoning, raw_answer = raw.removeprefix("<think>\n").split("</think>")
    assert raw_answer.startswith("\n\n")  # seed 004's shape: "<think>\n...</think>\n\nanswer"
    assert raw_reasoning.strip() == reasoning and raw_answer.lstrip() == answer
    assert out[ReasoningFormat.HIDDEN][:2] == ("", answer)


def test_no_reasoning_when_the_prompt_does_not_open_it_and_the_model_does_not(r1_engine):
    prompt = r1_engine.runner.tokenize("Hello", add_special=True, parse_special=False)
    deltas = generate(r1_engine, prompt, max_tokens=8, reasoning=ReasoningParams(budget=2))
    tokens = tokens_of(deltas)
    # a character the output was cut inside is dropped (not sent as U+FFFD): decoded as a stream, not final
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(b"".join(r1_engine.runner.token_piece(t) for t in tokens))
    assert "<think>" not in text
    assert "".join(d.text for d in deltas) == text and deltas[-1].num_reasoning_tokens == 0
    assert len(tokens) == 8  # no budget to enforce: nothing was forced
    # without reasoning options (legacy completions) the output is never parsed
    plain = generate(r1_engine, chat_prompt(r1_engine), max_tokens=6)
    assert plain[-1].num_reasoning_tokens == 0 and all(not d.reasoning_text for d in plain)


def test_concurrent_budgets_in_shared_steps(r1_engine):
    prompt = chat_prompt(r1_engine)

    async def run():
        async def one(budget):
            params = SamplingParams(temperature=0.8, seed=budget, ignore_eos=True, max_tokens=budget + 8,
                                    reasoning=ReasoningParams(budget=budget))
            return [d async for d in r1_engine.submit(GenerateRequest(prompt, params))]

        return await asyncio.gather(*(one(b) for b in (0, 2, 3, 6)))

    before = r1_engine.stats()["max_seqs_in_step"]
    for budget, deltas in zip((0, 2, 3, 6), asyncio.run(run())):
        tokens = tokens_of(deltas)
        if think_close_id(r1_engine) not in tokens[:budget]:
            assert tokens[budget: budget + 2] == close_tokens(r1_engine)
            assert deltas[-1].num_reasoning_tokens == budget
        assert len(tokens) == budget + 8 and deltas[-1].finish_reason == FinishReason.LENGTH
    assert r1_engine.stats()["max_seqs_in_step"] >= max(before, 2)


def test_a_grammar_applies_only_after_the_reasoning(r1_engine):
    prompt = chat_prompt(r1_engine)
    for seed in range(3):
        deltas = generate(r1_engine, prompt, max_tokens=60, temperature=0.9, seed=seed,
                          reasoning=ReasoningParams(budget=3), grammar=schema_grammar(SMALL_SCHEMA))
        final = deltas[-1]
        # the grammar ends the answer (ignore_eos or not): a finished grammar allows only end-of-generation
        assert final.finish_reason == FinishReason.STOP and final.num_reasoning_tokens == 3
        tokens = tokens_of(deltas)
        assert tokens[3:5] == close_tokens(r1_engine)
        answer = json.loads("".join(d.text for d in deltas))
        jsonschema.validate(answer, SMALL_SCHEMA)
        assert "".join(d.reasoning_text for d in deltas)  # the reasoning was free noise, not JSON


def test_a_forced_tool_call_in_deepseek_syntax(tiny_ggufs):
    engine = LlamaCppEngine(tiny_ggufs["deepseek-r1"], "tiny-v3", ctx_size=256, parallel=2, batch_size=64, threads=1)
    try:
        functions, forced = check_tools([{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                                  "required": ["city"], "additionalProperties": False}}}],
            {"type": "function", "function": {"name": "get_weather"}})
        markers = {m for m in MARKERS if len(engine.tokenize(m, add_special=False, parse_special=True)) == 1}
        assert CALLS_BEGIN in markers and SEP in markers  # control tokens of the V3 vocabulary
        grammar = tool_call_grammar(functions, forced, DEEPSEEK, parallel=False, single_tokens=markers)
        deltas = generate(engine, chat_prompt(engine), max_tokens=96, temperature=0.7, seed=3,
                          reasoning=ReasoningParams(budget=2), grammar=grammar, tool_format=DEEPSEEK)
        final = deltas[-1]
        assert final.finish_reason == FinishReason.TOOL_CALLS and final.num_reasoning_tokens == 2
        calls = [c for d in deltas for c in d.tool_calls]
        assert [(c.name, c.index) for c in calls] == [("get_weather", 0)]
        assert json.loads(calls[0].arguments)["city"] in ("Paris", "Oslo")
        assert "".join(d.text for d in deltas) == ""  # the call markers never show as content
    finally:
        engine.close()


def test_a_grammar_llama_cpp_cannot_parse_fails_only_its_request(r1_engine):
    from deepserve.engine.types import GrammarSpec

    request = GenerateRequest(chat_prompt(r1_engine), SamplingParams(
        max_tokens=4, temperature=0.0, grammar=GrammarSpec(gbnf="root ::= (", root="root")))

    async def run():
        return [d async for d in r1_engine.submit(request)]

    deltas = asyncio.run(run())
    assert deltas[-1].finish_reason == FinishReason.ERROR and "grammar" in deltas[-1].error
    assert request.started is False  # nothing of it was computed: billing charges none of it
    assert generate(r1_engine, chat_prompt(r1_engine), max_tokens=2)[-1].finish_reason == FinishReason.LENGTH
