"""response_format → GBNF: what is supported converts, what is not is refused with a 400 naming it."""

from __future__ import annotations

import pytest

from deepserve.errors import InvalidRequestError
from deepserve.structured import literal, response_format_grammar, schema_grammar

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
    ({"type": "integer", "minimum": 0}, "'minimum' is not supported"),
    ({"type": "object", "properties": {"age": {"type": "number", "exclusiveMaximum": 3}}},
     "#/properties/age: the JSON schema keyword 'exclusiveMaximum'"),
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
