"""response_format through the real engine on the bundled SmolLM2, 20 seeds each: every answer json.loads
and validates against its schema (a grammar guarantees that once generation ends, so the schemas bound the
output and max_tokens leaves room: finish_reason must be "stop"). Unsupported schema features get a 400."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

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
                  messages: list[dict] = MESSAGES):
    async def one(seed: int):
        return await client.chat.completions.create(model=model, messages=messages, seed=seed, temperature=0.7,
                                                    max_tokens=max_tokens, response_format=response_format)

    return await asyncio.gather(*(one(seed) for seed in SEEDS))


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


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}, "'minimum'"),
    ({"type": "string", "format": "email"}, "'email'"),
])
def test_unsupported_schema_features_are_a_400_naming_them(client, server, schema, named):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    error = info.value.body
    assert named in error["message"] and error["param"] == "response_format"
    assert error["type"] == "invalid_request_error"
