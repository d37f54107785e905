"""Structured output and tool calls over HTTP with the official `openai` client, on a tiny random model whose
unconstrained output is garbage: a JSON-schema answer always parses and validates, a required or named tool
call always names a tool with schema-valid arguments, and a conversation with a tool's result goes on."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import OpenAI

from helpers import KEY, chat, start
from serving.server import ServeOptions
from tiny import make_lora_artifact

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "unit": {"enum": ["c", "f"]}},
          "required": ["city", "days", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the forecast for a city",
                                            "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    art = make_lora_artifact(tmp_path_factory.mktemp("tools"), experts=("a", "b"), max_position_embeddings=2048)
    srv = start(ServeOptions(artifact=art, api_key=KEY, max_batch=8))
    yield OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    srv.stop()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_always_validate(client, temperature):
    for seed in range(3):
        res = client.chat.completions.create(
            model="twin", messages=chat("weather?"), temperature=temperature, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}})
        assert res.choices[0].finish_reason == "stop", res.choices[0].message.content
        jsonschema.validate(json.loads(res.choices[0].message.content), SCHEMA)


def test_unconstrained_output_is_not_json(client):
    res = client.chat.completions.create(model="twin", messages=chat("weather?"), temperature=0, max_tokens=30)
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(res.choices[0].message.content), SCHEMA)


def test_vllm_structured_fields(client):
    res = client.completions.create(model="core", prompt="pick", max_tokens=10, temperature=1.0, seed=1,
                                    extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert res.choices[0].text in ("red", "green", "blue")
    res = client.completions.create(model="core", prompt="digits", max_tokens=10, temperature=1.0, seed=2,
                                    extra_body={"guided_regex": "[0-9]{3}-[a-c]{2}"})
    import re
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", res.choices[0].text)
    res = client.chat.completions.create(model="core", messages=chat("json"), max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(res.choices[0].message.content), dict)


def test_tool_call_round_trip(client):
    messages = chat("what is the weather in Paris for 3 days?")
    res = client.chat.completions.create(model="twin", messages=messages, tools=[WEATHER, TIME],
                                         tool_choice="required", temperature=0, max_tokens=200)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name in ("get_weather", "get_time") and call.id
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMA if call.function.name == "get_weather" else TIME["function"]["parameters"])

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sun"})}]
    res = client.chat.completions.create(model="twin", messages=messages, tools=[WEATHER, TIME],
                                         tool_choice={"type": "function", "function": {"name": "get_time"}},
                                         temperature=0, max_tokens=100)
    call = res.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_streamed_tool_calls(client):
    stream = client.chat.completions.create(model="core", messages=chat("time?"), tools=[WEATHER, TIME],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=0, max_tokens=200, stream=True)
    calls, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMA)


def test_bad_tools_are_a_400(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(model="core", messages=chat("x"), tools=[WEATHER], max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(BadRequestError, match="cannot be combined"):
        client.chat.completions.create(model="core", messages=chat("x"), tools=[WEATHER], max_tokens=5,
                                       tool_choice="required", response_format={"type": "json_object"})
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="core", messages=chat("x"), max_tokens=5,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "nope"}}})
