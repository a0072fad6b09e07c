"""response_format through the real engine on the bundled SmolLM2, 20 seeds each (6 for integer bounds):
every answer json.loads and validates against its schema (a grammar guarantees that once generation ends, so
the schemas bound the output and max_tokens leaves room: finish_reason must be "stop"). Unsupported schema
features get a 400."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

SEEDS = range(20)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "member"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON: name, age, favourite colour, pets."}]


async def answers(client: openai.AsyncOpenAI, model: str, response_format: dict, max_tokens: int,
                  messages: list[dict] = MESSAGES, seeds: range = SEEDS):
    async def one(seed: int):
        return await client.chat.completions.create(model=model, messages=messages, seed=seed, temperature=0.7,
                                                    max_tokens=max_tokens, response_format=response_format)

    return await asyncio.gather(*(one(seed) for seed in seeds))


def test_json_schema_answers_parse_and_validate_for_every_seed(async_client, server):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    results = asyncio.run(answers(async_client, server.model, response_format, max_tokens=120))
    for seed, r in zip(SEEDS, results):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        value = json.loads(choice.message.content)
        jsonschema.validate(value, PERSON)
    assert len({r.choices[0].message.content for r in results}) > 5  # the seeds give different answers


def test_json_object_answers_are_json_objects_for_every_seed(async_client, server):
    # json_object bounds nothing, so the prompt asks for a small object (this one ended for 40 seeds of 40)
    messages = [{"role": "user", "content": "Return a JSON object with the keys name and city for a fictional person."}]
    results = asyncio.run(answers(async_client, server.model, {"type": "json_object"}, max_tokens=120,
                                  messages=messages))
    for seed, r in zip(SEEDS, results):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        assert isinstance(json.loads(choice.message.content), dict)
    assert len({r.choices[0].message.content for r in results}) > 5


def test_structured_stream_concatenates_to_valid_json(client, server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    chunks = list(client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=40, seed=1, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_integer_bounds_hold_for_every_seed(async_client, client, server):
    # the prompt asks for a number outside the bounds: only the grammar keeps n within 3..7
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7}}, "required": ["n"]}
    messages = [{"role": "user", "content": 'Reply with the JSON object {"n": 1000}.'}]
    seeds = range(6)
    results = asyncio.run(answers(async_client, server.model, {"type": "json_schema", "json_schema": {
        "name": "pick", "strict": True, "schema": schema}}, max_tokens=20, messages=messages, seeds=seeds))
    for seed, r in zip(seeds, results):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        value = json.loads(choice.message.content)
        jsonschema.validate(value, schema)
        assert type(value["n"]) is int and 3 <= value["n"] <= 7, (seed, value)

    # the openai SDK's parse() with a Pydantic model (Field(ge=, le=) become minimum / maximum)
    class Pick(BaseModel):
        n: int = Field(ge=3, le=7)

    parsed = client.chat.completions.parse(model=server.model, messages=messages, seed=1, max_tokens=20,
                                           response_format=Pick)
    assert parsed.choices[0].finish_reason == "stop"
    assert isinstance(parsed.choices[0].message.parsed, Pick) and 3 <= parsed.choices[0].message.parsed.n <= 7


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "object", "properties": {"age": {"type": "number", "minimum": 0}}},
     "#/properties/age: the JSON schema keyword 'minimum' is not supported on type 'number': minimum/maximum are "
     "supported on integers only"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 2}}},
     "#/properties/n: no integer is within the bounds (at least 3 and at most 2)"),
    ({"type": "integer", "multipleOf": 2}, "the JSON schema keyword 'multipleOf' is not supported"),
    ({"type": "string", "format": "email"}, "'email'"),
])
def test_unsupported_schema_features_are_a_400_naming_them(client, server, schema, named):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    error = info.value.body
    assert named in error["message"] and error["param"] == "response_format"
    assert error["type"] == "invalid_request_error"
