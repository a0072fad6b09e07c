"""response_format → GBNF: what is supported converts, what is not is refused with a 400 naming it. Integers
with bounds are checked string by string with llama.cpp's own grammar engine."""

from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
import pytest

from deepserve.bundled import bundled_model_path
from deepserve.engine.types import GrammarSpec
from deepserve.errors import InvalidRequestError
from deepserve.structured import literal, response_format_grammar, schema_grammar
from deepserve.tools import HERMES, tool_call_grammar

PERSON = {
    "title": "Person", "description": "annotations are fine",
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12, "description": "short"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string", "format": "date"}, "maxItems": 2},
        "when": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
    "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}},
}


def test_supported_schemas_convert():
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert grammar.root == "root"
    assert "root ::=" in grammar.gbnf and "Pet" in grammar.gbnf
    # JSON strings never hold raw control characters (json.loads would refuse them)
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in grammar.gbnf
    assert response_format_grammar({"type": "text"}) is None and response_format_grammar(None) is None
    assert "object" in response_format_grammar({"type": "json_object"}).gbnf
    # Cloudflare's shape: the schema itself under json_schema
    assert response_format_grammar({"type": "json_schema", "json_schema": {"type": "boolean"}}).gbnf
    # OpenAI without a schema: any JSON object
    assert response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "strict": True}}).gbnf
    for schema in ({}, True, {"description": "anything"}, {"type": ["string", "null"]}, {"type": "array"},
                   {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
                   {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}]}):
        assert schema_grammar(schema).gbnf


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "number", "minimum": 0},
     "#: the JSON schema keyword 'minimum' is not supported on type 'number': minimum/maximum are supported on "
     "integers only"),
    ({"type": "object", "properties": {"age": {"type": "number", "exclusiveMaximum": 3}}},
     "#/properties/age: the JSON schema keyword 'exclusiveMaximum' is not supported on type 'number'"),
    ({"maximum": 3}, "'maximum' is not supported on a schema without a type: minimum/maximum are supported on "
                     "integers only"),
    ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 10, "maximum": 9}}},
     "schema#/properties/age: no integer is within the bounds (at least 10 and at most 9)"),
    ({"type": "array", "items": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 4}},
     "schema#/items: no integer is within the bounds (at least 4 and at most 3)"),
    ({"type": "integer", "minimum": 0.5, "maximum": 0.9}, "no integer is within the bounds (at least 1 and at most 0)"),
    ({"type": "integer", "minimum": "1"}, "#: 'minimum' must be a finite number, got \"1\""),
    ({"type": "integer", "exclusiveMinimum": True}, "'exclusiveMinimum' must be a finite number, got true"),
    ({"type": "integer", "maximum": float("inf")}, "'maximum' must be a finite number, got Infinity"),
    ({"type": "integer", "maximum": 1e300}, "'maximum' is too large: integer bounds are supported up to 40 digits"),
    ({"type": "integer", "minimum": -10**40}, "'minimum' is too large"),
    ({"type": "integer", "multipleOf": 2}, "the JSON schema keyword 'multipleOf' is not supported"),
    ({"type": "integer", "minimum": 0, "multipleOf": 5}, "'multipleOf' is not supported"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"not": {"type": "string"}}, "'not'"),
    ({"if": {}, "then": {}}, "'if'"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'"),
    ({"type": "object", "minProperties": 1}, "'minProperties'"),
    ({"type": "string", "format": "email"}, "format 'email'"),
    ({"type": "string", "pattern": "abc"}, "anchored"),
    ({"$ref": "https://example.com/schema.json"}, "only local $ref"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'required' names 'b'"),
    ({"type": ["string", "null"], "maxLength": 3}, "'type' as a list"),
    ({"anyOf": [{"type": "string"}], "minLength": 2}, "beside anyOf"),
    ({"type": "strin"}, "unknown type"),
    ({"type": "string", "pattern": "^a$", "maxLength": 2}, "'pattern' together with 'maxLength'"),
    (False, "accepts nothing"),
    # bounds one request could crash (llama.cpp's grammar parser recursing per repetition) or stall the engine with
    ({"type": "array", "items": {"type": "integer"}, "minItems": 30000}, "minItems 30000 is more than the 1000"),
    ({"type": "string", "minLength": 100000}, "minLength 100000 is more than the 1000"),
    ({"type": "array", "items": {}, "minItems": 5, "maxItems": 2}, "minItems 5 is more than maxItems 2"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength 3 is more than maxLength 2"),
    ({"type": "string", "pattern": "^(a$"}, "not a valid regular expression"),
    ({"type": "string", "pattern": "^a{100000}$"}, "repeats more than the 1000"),
    ({"enum": list(range(1001))}, "1001 enum values"),
    ({"anyOf": [{"const": i} for i in range(600)] + [{"enum": list(range(500))}]}, "1101 enum values"),
    (functools.reduce(lambda inner, _: {"type": "array", "items": inner}, range(500), {}), "nested more than 64 levels"),
])
def test_unsupported_features_are_refused_by_name(schema, named):
    with pytest.raises(InvalidRequestError) as info:
        response_format_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    assert info.value.status_code == 400 and info.value.param == "response_format"
    assert named in info.value.message
    assert info.value.message.startswith("response_format.json_schema.schema")


def test_bad_response_formats():
    for value, message in [({"type": "xml"}, "must be 'text', 'json_object' or 'json_schema'"),
                           ("json", "must be an object"),
                           ({"type": "json_schema"}, "json_schema must be an object")]:
        with pytest.raises(InvalidRequestError, match=message):
            response_format_grammar(value)


def test_literal_escapes():
    assert literal('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


# ---- integers with bounds, checked by llama.cpp's own grammar engine -------------------------------------

class GrammarEngine:
    """llama.cpp's grammar sampler (what generation uses) on the bundled model's vocabulary, loaded alone
    (vocab_only: no weights, no context). A text is fed one character (one token) at a time, each first
    offered to the grammar; the text is accepted if every character is allowed and then end-of-generation."""

    def __init__(self) -> None:
        import llama_cpp as llama

        from deepserve.engine.llamacpp.runner import _TOKEN_DATA, _init_backend

        _init_backend()
        self.llama, self.token_data = llama, _TOKEN_DATA
        params = llama.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        self.model = llama.llama_model_load_from_file(str(bundled_model_path()).encode(), params)
        assert self.model
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.end = llama.llama_vocab_eos(self.vocab)
        assert llama.llama_vocab_is_eog(self.vocab, self.end)
        self.tokens: dict[str, int] = {}

    def token(self, char: str) -> int:
        if char not in self.tokens:
            data = char.encode()
            out = (self.llama.llama_token * 8)()
            n = self.llama.llama_tokenize(self.vocab, data, len(data), out, 8, False, False)
            assert n == 1, f"{char!r} is {n} tokens"
            self.tokens[char] = out[0]
        return self.tokens[char]

    def _allows(self, sampler: int, token: int) -> bool:
        one = np.array([(token, 0.0, 0.0)], dtype=self.token_data)
        array = self.llama.llama_token_data_array(data=one.ctypes.data_as(self.llama.llama_token_data_p), size=1,
                                                  selected=-1, sorted=False)
        self.llama.llama_sampler_apply(sampler, ctypes.byref(array))
        return math.isfinite(float(one["logit"][0]))

    def accepts(self, grammar: GrammarSpec, text: str) -> bool:
        sampler = self.llama.llama_sampler_init_grammar(self.vocab, grammar.gbnf.encode(), grammar.root.encode())
        assert sampler, "llama.cpp could not parse the grammar"
        try:
            for char in text:
                token = self.token(char)
                if not self._allows(sampler, token):
                    return False
                self.llama.llama_sampler_accept(sampler, token)
            return self._allows(sampler, self.end)
        finally:
            self.llama.llama_sampler_free(sampler)

    def close(self) -> None:
        self.llama.llama_model_free(self.model)


@pytest.fixture(scope="module")
def engine():
    grammar_engine = GrammarEngine()
    yield grammar_engine
    grammar_engine.close()


def in_range(text: str, low: int | None, high: int | None) -> bool:
    """Whether `text` is a JSON integer as the grammar should spell it: no leading zero, no "-0", within the
    bounds. A side without a bound reaches 16 digits (as an integer without bounds), or as many digits as the
    one bound has when that bound is on the same side of zero (minimum 10**17 alone allows 18 digits)."""
    if text != text.strip():
        return False
    try:
        value = int(text)
    except ValueError:
        return False
    if text != str(value) or (low is not None and value < low) or (high is not None and value > high):
        return False
    if (value > 0 and high is None) or (value < 0 and low is None):
        other = low if high is None else high
        longest = max(16, len(str(abs(other)))) if other is not None and (other > 0) == (value > 0) else 16
        return len(str(abs(value))) <= longest
    return True


ODD = ["007", "05", "00", "-0", "-00", "-03", "1.5", "1.0", "1e3", "+1", "", "-", "--1", "1-", "0x1", " 1", "null"]


@pytest.mark.parametrize(("bounds", "low", "high"), [
    ({"minimum": 0, "maximum": 10}, 0, 10),
    ({"minimum": 1, "maximum": 100}, 1, 100),
    ({"minimum": -5, "maximum": 5}, -5, 5),
    ({"minimum": -100, "maximum": -7}, -100, -7),
    ({"minimum": 7, "maximum": 7}, 7, 7),
    ({"minimum": 0, "maximum": 0}, 0, 0),
    ({"minimum": 99, "maximum": 1001}, 99, 1001),
    ({"minimum": -1234, "maximum": 987}, -1234, 987),
    ({"minimum": 15, "maximum": 35}, 15, 35),
    ({"minimum": -347, "maximum": -125}, -347, -125),
    ({"minimum": 123, "maximum": 4567}, 123, 4567),
    ({"minimum": 10}, 10, None),
    ({"minimum": 105}, 105, None),  # llama.cpp's own one-sided rule also accepts 15..19 and 100..104 here
    ({"minimum": -12}, -12, None),
    ({"maximum": -3}, None, -3),  # ... and "-03" here
    ({"maximum": 5}, None, 5),
    ({"exclusiveMinimum": 0, "exclusiveMaximum": 10}, 1, 9),
    ({"exclusiveMinimum": -1}, 0, None),
    ({"minimum": 1.5, "maximum": 9.5}, 2, 9),
    ({"exclusiveMinimum": 0.5, "exclusiveMaximum": 3.5}, 1, 3),
    ({"minimum": 2, "exclusiveMinimum": 4, "maximum": 9, "exclusiveMaximum": 9}, 5, 8),  # the tighter bound wins
])
def test_bounded_integers_accept_exactly_their_range(engine, bounds, low, high):
    grammar = schema_grammar({"type": "integer", **bounds})
    first, last = (low if low is not None else -300), (high if high is not None else 300)
    texts = [str(n) for n in range(min(first, -20) - 20, max(last, 20) + 21)] + ODD
    texts += ["1" + "0" * 15, "9" * 16, "1" + "0" * 16, "-" + "9" * 16, "-1" + "0" * 16]
    accepted = [t for t in texts if engine.accepts(grammar, t)]
    assert accepted == [t for t in texts if in_range(t, low, high)]
    assert str(low if low is not None else high) in accepted


@pytest.mark.parametrize(("low", "high"), [(0, 2**31 - 1), (-2**31, 2**31 - 1), (-2**63, 2**63 - 1), (0, 2**64 - 1),
                                           (10**15, None), (10**17, None), (None, -10**17), (None, 10**17)])
def test_large_bounds_are_exact(engine, low, high):
    schema = {"type": "integer", **({"minimum": low} if low is not None else {}),
              **({"maximum": high} if high is not None else {})}
    grammar = schema_grammar(schema)
    numbers = set(range(-30, 31))
    for edge in (low, high, 10**15, 10**16, 2**31, 2**63, 10**17):
        if edge is not None:
            numbers.update(sign * edge + d for sign in (1, -1) for d in range(-2, 3))
    numbers.update({123456789012345, 9876543210987654, 2147483646, 4294967296, 18446744073709551614})
    texts = sorted(map(str, numbers)) + ["0" + str(abs(low or 0) + 1), "-0"]
    assert [t for t in texts if engine.accepts(grammar, t)] == [t for t in texts if in_range(t, low, high)]


def test_bounded_integers_work_anywhere_in_a_schema(engine):
    schema = {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120, "description": "annotations are fine"},
            "scores": {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0, "maximum": 5}},
            "level": {"anyOf": [{"$ref": "#/$defs/Level"}, {"type": "null"}]},
        },
        "required": ["age", "scores", "level"],
        "additionalProperties": False,
        "$defs": {"Level": {"type": "integer", "minimum": -3, "maximum": -1}},
    }
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    good = ['{"age": 0, "scores": [], "level": null}', '{"age": 120, "scores": [1, 5, 3], "level": -3}',
            '{"age": 37, "scores": [2], "level": -1}']
    bad = ['{"age": 121, "scores": [], "level": null}', '{"age": -1, "scores": [], "level": null}',
           '{"age": 007, "scores": [], "level": null}', '{"age": 1, "scores": [0], "level": null}',
           '{"age": 1, "scores": [6], "level": null}', '{"age": 1, "scores": [], "level": 0}',
           '{"age": 1, "scores": [], "level": -4}', '{"age": 1.5, "scores": [], "level": null}']
    assert [engine.accepts(grammar, text) for text in good] == [True] * len(good)
    assert [engine.accepts(grammar, text) for text in bad] == [False] * len(bad)
    # a tool's parameters go through the same converter
    assert "[1-5]" in tool_call_grammar([{"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}}}}], "f", HERMES).gbnf


def test_an_unbounded_integer_is_still_the_converters():
    assert "integral-part" in schema_grammar({"type": "integer"}).gbnf


def test_a_maximum_too_large_to_spell_is_left_out_not_refused():
    """maxItems 30,000 once crashed llama.cpp's grammar parser (a repetition is a recursion); pydantic's common
    max_length=4096 must still be accepted: such a maximum is left to max_tokens."""
    for schema in ({"type": "array", "items": {"type": "integer"}, "maxItems": 30000},
                   {"type": "object", "properties": {"note": {"type": "string", "maxLength": 4096}}}):
        grammar = response_format_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
        assert len(grammar.gbnf) < 3000  # spelled out, the maximum alone would be a rule nested thousands deep
    bounded = response_format_grammar({"type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                                                          "maxLength": 5}}})
    assert "(char (char (char (char (char)?)?)?)?)?" in bounded.gbnf  # a small maximum is still spelled out
