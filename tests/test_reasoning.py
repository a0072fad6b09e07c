"""The `<think>` parser and output styles over scripted streams: tags split at every byte, a prompt that
opened the block, a block never closed, no reasoning at all."""

from __future__ import annotations

import codecs
import itertools

import pytest

from deepserve.engine.types import ReasoningFormat
from deepserve.reasoning import (
    EFFORT_BUDGETS,
    Part,
    ReasoningShaper,
    ThinkParser,
    budget_for,
    open_reasoning,
    prompt_reasoning_prefix,
    strip_reasoning,
    strip_reasoning_history,
)


def run(pieces: list[str], *, starts_in_reasoning: bool) -> tuple[str, str, list[Part]]:
    """Feed pieces; return (reasoning, content, the tags seen) and check nothing is lost."""
    parser = ThinkParser(starts_in_reasoning=starts_in_reasoning)
    parts = [p for piece in pieces for p in parser.feed(piece)] + parser.flush()
    # every character lands somewhere, in order; but a `</think>` cut short at the end is dropped (markup)
    emitted, given = "".join(text for _, text in parts), "".join(pieces)
    assert emitted == given or (given.startswith(emitted) and "</think>".startswith(given[len(emitted):]))
    kinds = [k for k, _ in parts]
    assert kinds == sorted(kinds, key=[Part.OPEN, Part.REASONING, Part.CLOSE, Part.CONTENT].index)  # never back
    reasoning = "".join(t for k, t in parts if k == Part.REASONING)
    content = "".join(t for k, t in parts if k == Part.CONTENT)
    return reasoning, content, [k for k in kinds if k in (Part.OPEN, Part.CLOSE)]


def byte_splits(text: str, cuts: int):
    """`text` cut into pieces at every combination of `cuts` byte positions, decoded as the engine does
    (an incremental UTF-8 decoder: a piece never ends inside a character)."""
    data = text.encode()
    for positions in itertools.combinations(range(1, len(data)), cuts):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        bounds = [0, *positions, len(data)]
        pieces = [decoder.decode(data[a:b]) for a, b in zip(bounds, bounds[1:])]
        pieces.append(decoder.decode(b"", final=True))
        yield pieces


# (output, starts_in_reasoning) -> (reasoning, content, tags)
CASES = {
    ("Let me think: 2+2=4.\n</think>\n\nThe answer is 4.", True): ("Let me think: 2+2=4.\n", "\n\nThe answer is 4.", [Part.CLOSE]),
    ("<think>\nhmm</think>ok", False): ("\nhmm", "ok", [Part.OPEN, Part.CLOSE]),
    ("\n <think>é</think>", False): ("é", "", [Part.OPEN, Part.CLOSE]),
    ("<think>\nnever closed </thi", False): ("\nnever closed ", "", [Part.OPEN]),  # a cut inside the close tag
    ("still thinking, no end", True): ("still thinking, no end", "", []),
    ("No reasoning here. <think> is just text", False): ("", "No reasoning here. <think> is just text", []),
    ("<thinking>not a tag", False): ("", "<thinking>not a tag", []),
    ("<think>dup open</think>answer", True): ("dup open", "answer", [Part.OPEN, Part.CLOSE]),
    ("a</think>b</think>c", True): ("a", "b</think>c", [Part.CLOSE]),
    ("  ", False): ("", "  ", []),
    ("", True): ("", "", []),
    ("思考</think>答案", True): ("思考", "答案", [Part.CLOSE]),
}


@pytest.mark.parametrize(("output", "starts"), list(CASES))
def test_tags_split_at_every_byte_boundary(output, starts):
    expected = CASES[output, starts]
    assert run([output], starts_in_reasoning=starts) == expected
    for cuts in (1, 2):
        for pieces in byte_splits(output, cuts):
            assert run(pieces, starts_in_reasoning=starts) == expected, pieces


def test_one_character_per_token_and_state_flags():
    parser = ThinkParser(starts_in_reasoning=True)
    assert parser.in_reasoning and not parser.answering and not parser.closed
    states = []
    for ch in "ab</think>c":
        parser.feed(ch)
        states.append(parser.in_reasoning)
    assert states == [True] * 9 + [False, False]  # still reasoning until the tag's last character
    assert parser.closed and parser.answering

    fresh = ThinkParser(starts_in_reasoning=False)
    assert fresh.answering and not fresh.in_reasoning  # may be the answer: a grammar can apply from here
    fresh.feed("<thi")
    assert fresh.answering  # undecided
    fresh.feed("nk>")
    assert fresh.in_reasoning and not fresh.answering


def shape(fmt: ReasoningFormat, pieces: list[str], *, starts: bool, prefix: str = "") -> tuple[str, str, str]:
    shaper = ReasoningShaper(fmt, starts_in_reasoning=starts, raw_prefix=prefix)
    out = [shaper.feed(p) for p in pieces] + [shaper.flush()]
    return tuple("".join(o[i] for o in out) for i in range(3))


R1_OUTPUT = "\nLet me count: s-t-r-a-w-b-e-r-r-y.\n\nThree r's.\n</think>\n\nThere are 3 r's in 'strawberry'."


@pytest.mark.parametrize("cuts", [0, 1, 2])
def test_output_styles(cuts):
    splits = [[R1_OUTPUT]] if cuts == 0 else list(byte_splits(R1_OUTPUT, cuts))[::37]
    for pieces in splits:
        # deepseek: apart and trimmed; the answer without the blank line after </think>
        assert shape(ReasoningFormat.DEEPSEEK, pieces, starts=True, prefix="<think>\n") == (
            "Let me count: s-t-r-a-w-b-e-r-r-y.\n\nThree r's.", "", "There are 3 r's in 'strawberry'.")
        # raw: byte for byte what the model wrote after the prompt's "<think>\n" (seed 004's shape)
        reasoning, shown, content = shape(ReasoningFormat.RAW, pieces, starts=True, prefix="<think>\n")
        assert reasoning == "" and shown + content == "<think>\n" + R1_OUTPUT
        assert content == "\n\nThere are 3 r's in 'strawberry'."  # only the answer goes through stop strings
        # hidden: the answer only
        assert shape(ReasoningFormat.HIDDEN, pieces, starts=True) == ("", "", "There are 3 r's in 'strawberry'.")


def test_deepseek_style_streams_reasoning_as_it_comes_and_holds_only_trailing_whitespace():
    shaper = ReasoningShaper(ReasoningFormat.DEEPSEEK, starts_in_reasoning=True)
    assert shaper.feed("\n") == ("", "", "")
    assert shaper.feed("One") == ("One", "", "")
    assert shaper.feed(" two\n") == (" two", "", "")  # the newline waits: it may be the last
    assert shaper.feed("three") == ("\nthree", "", "")
    assert shaper.feed("\n</think>\n\n") == ("", "", "")
    assert shaper.feed("Answer\n") == ("", "", "Answer\n")


def test_raw_style_without_a_prompt_tag_and_without_reasoning():
    assert shape(ReasoningFormat.RAW, ["<think>x</think>", "y"], starts=False) == ("", "<think>x</think>", "y")
    assert shape(ReasoningFormat.RAW, ["plain ", "answer"], starts=False) == ("", "", "plain answer")
    assert shape(ReasoningFormat.DEEPSEEK, ["plain ", "answer"], starts=False) == ("", "", "plain answer")
    # never closed: all reasoning, no answer
    assert shape(ReasoningFormat.DEEPSEEK, ["half a thought"], starts=True) == ("half a thought", "", "")
    assert shape(ReasoningFormat.HIDDEN, ["half a thought"], starts=True) == ("", "", "")


def test_prompt_reasoning_prefix():
    assert prompt_reasoning_prefix("<｜Assistant｜><think>\n") == "<think>\n"
    assert prompt_reasoning_prefix("<｜Assistant｜><think>\nPartly") == "<think>\nPartly"
    assert prompt_reasoning_prefix("<think>old</think><｜Assistant｜>") is None
    assert prompt_reasoning_prefix("<|im_start|>assistant\n") is None
    assert prompt_reasoning_prefix("user: <think><|im_end|>\n<|im_start|>assistant\n") is None  # user text


def test_budgets():
    assert (EFFORT_BUDGETS["low"], EFFORT_BUDGETS["medium"], EFFORT_BUDGETS["high"]) == (1024, 4096, 16384)
    assert budget_for("low", None) == 1024
    assert budget_for("high", 7) == 7  # explicit wins
    assert budget_for(None, 0) == 0
    assert budget_for(None, None) is None and budget_for("max", None) is None


def test_history_hygiene():
    messages = [
        {"role": "user", "content": "Hi <think>user text stays</think>"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nHello!", "reasoning_content": "x"},
        {"role": "assistant", "content": "R1 style\n</think>\n\nAnswer", "reasoning": "y"},
        {"role": "assistant", "content": "Plain answer"},
        {"role": "assistant", "content": "ok <think>never closed"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
    ]
    cleaned = strip_reasoning_history(messages)
    assert cleaned[0] == messages[0]
    assert cleaned[1] == {"role": "assistant", "content": "Hello!"}
    assert cleaned[2] == {"role": "assistant", "content": "Answer"}
    assert cleaned[3] == {"role": "assistant", "content": "Plain answer"}
    assert cleaned[4]["content"] == "ok"
    assert cleaned[5] == messages[5]
    assert messages[1]["reasoning_content"] == "x"  # the caller's messages are not modified
    assert strip_reasoning("<think>a</think>b<think>c</think>d") == "bd"


def test_open_reasoning_only_where_an_r1_prompt_leaves_the_tag_to_the_model():
    assert open_reasoning("<｜User｜>Hi<｜Assistant｜>") == "<｜User｜>Hi<｜Assistant｜><think>\n"
    assert prompt_reasoning_prefix(open_reasoning("<｜User｜>Hi<｜Assistant｜>")) == "<think>\n"
    for prompt in ("<｜User｜>Hi<｜Assistant｜><think>\n",  # the revised template opened it already
                   "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>",  # after tool outputs
                   "<|im_start|>assistant\n"):  # another family
        assert open_reasoning(prompt) == prompt
