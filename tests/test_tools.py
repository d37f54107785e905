"""OpenAI tools (serving/tools.py): validation of tools and tool_choice, the prompt through a chat template that
renders tools and through the fallback for one that does not, the parser of the model's output, streams, and
tool_choice "required" / a named function constraining a tiny random Llama to calls of the given tools."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

from serving.tools import (
    FALLBACK_PROMPT,
    ToolStream,
    check_tools,
    constraint_spec,
    parse_output,
    parse_tool_calls,
    prompt_messages,
    stream_tool_calls,
    template_uses_tools,
    tool_finish_reason,
    tool_plan,
)
from tiny import make_base, make_tokenizer
from twinrt.runtime.structured import StructuredCompiler

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99},
                                                                   "b": {"$ref": "#/$defs/small"}},
                                  "required": ["a", "b"], "$defs": {"small": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}}}}}
TOOLS = [WEATHER, ADD]
NAMES = ("get_weather", "add")
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
]
# a Hermes/Qwen-style template that renders tools, calls and results (as tool-use chat templates do)
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for m in messages if m.role != 'system' %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(plain, with_tools): the tiny tokenizer with its plain chat template and with TOOLS_TEMPLATE."""
    root = tmp_path_factory.mktemp("tools")
    plain = make_tokenizer(root / "plain")
    with_tools = AutoTokenizer.from_pretrained(root / "plain")
    with_tools.chat_template = TOOLS_TEMPLATE
    return plain, with_tools


def render(tok, messages, tools) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


# ---- validation --------------------------------------------------------------------------------------------------


def test_plan_defaults_and_modes():
    assert tool_plan(None).mode == "none" and tool_plan(TOOLS).mode == "auto"
    assert tool_plan(TOOLS, "none").mode == "none" and tool_plan(None, "none").tools == ()
    assert tool_plan([], "required").mode == "none"  # OpenAI: required with no tools behaves as none
    named = tool_plan(TOOLS, {"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
    assert (named.mode, named.name, named.parallel, named.names()) == ("named", "add", False, NAMES)
    assert tool_plan([{"type": "function", "function": {"name": "noop"}}]).parameters("noop") == {
        "type": "object", "properties": {}}


@pytest.mark.parametrize("tools, choice, message", [
    (None, "auto", "needs 'tools'"),
    (None, {"type": "function", "function": {"name": "add"}}, "needs 'tools'"),
    (TOOLS, "maybe", "must be 'none', 'auto', 'required'"),
    (TOOLS, {"type": "function", "function": {}}, "needs {'type': 'function'"),
    (TOOLS, {"type": "function", "function": {"name": "sub"}}, "'sub', which is not in 'tools'"),
    ({"get_weather": WEATHER}, None, "must be a list"),
    ([{"type": "retrieval"}], None, "only tools of type 'function'"),
    ([{"type": "function", "function": {"description": "x"}}], None, "needs a 'name'"),
    ([{"type": "function", "function": {"name": "two words"}}], None, "needs a 'name'"),
    ([WEATHER, WEATHER], None, "given twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None,
     "schema of an object"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "description must be a string"),
])
def test_bad_tools_and_tool_choice_raise(tools, choice, message):
    with pytest.raises(ValueError, match=message):
        tool_plan(tools, choice)


def test_a_parameters_schema_that_does_not_compile_is_a_value_error():
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "array", "uniqueItems": True}}}}}
    assert check_tools([bad])[0]["function"]["name"] == "f"
    with pytest.raises(ValueError, match="uniqueItems"):
        constraint_spec(tool_plan([bad], "required"))


# ---- the prompt --------------------------------------------------------------------------------------------------


def test_a_template_that_renders_tools_gets_them(tokenizers):
    _, tok = tokenizers
    assert template_uses_tools(tok)
    messages, tools = prompt_messages(tok, HISTORY, tool_plan(TOOLS))
    assert tools == list(check_tools(TOOLS))
    text = render(tok, messages, tools)
    assert '"name": "get_weather"' in text and "<tools>" in text and "# Tools" not in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>' in text
    assert "<tool_response>21 C</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


def test_a_template_without_tools_gets_the_fallback_system_prompt(tokenizers):
    tok, _ = tokenizers
    assert not template_uses_tools(tok)
    messages, tools = prompt_messages(tok, HISTORY, tool_plan(TOOLS))
    assert tools is None
    text = render(tok, messages, tools)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and json.dumps(WEATHER) in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>" in text
    assert "<|im_start|>tool" not in text
    first, _ = prompt_messages(tok, HISTORY[1:2], tool_plan(TOOLS))  # no system message: one is added
    assert first[0] == {"role": "system", "content": FALLBACK_PROMPT.format(
        tools="\n".join(json.dumps(t) for t in check_tools(TOOLS)))}


def test_tool_choice_none_leaves_tools_out(tokenizers):
    for tok in tokenizers:
        messages, tools = prompt_messages(tok, HISTORY[:2], tool_plan(TOOLS, "none"))
        assert tools is None and messages == HISTORY[:2]
        assert "get_weather" not in render(tok, messages, tools)


# ---- parsing -----------------------------------------------------------------------------------------------------


def calls_of(out) -> list[tuple[str, dict]]:
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in out.tool_calls)
    assert len({c["id"] for c in out.tool_calls}) == len(out.tool_calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls]


PARIS = {"city": "Paris", "unit": "c"}
CALL = json.dumps({"name": "get_weather", "arguments": PARIS})


@pytest.mark.parametrize("text, content, calls", [
    (f"<tool_call>\n{CALL}\n</tool_call>", None, [("get_weather", PARIS)]),
    (f"Let me check.\n<tool_call>{CALL}</tool_call>", "Let me check.", [("get_weather", PARIS)]),
    (f'<tool_call>{CALL}</tool_call><tool_call>{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}</tool_call>',
     None, [("get_weather", PARIS), ("add", {"a": 1, "b": 2})]),
    (f"<tool_call>{CALL}", None, [("get_weather", PARIS)]),  # unclosed at the end of the output
    (f"<tool_call>{{\"name\": \"get_weather\", \"arguments\": {json.dumps(json.dumps(PARIS))}}}</tool_call>",
     None, [("get_weather", PARIS)]),  # arguments as JSON text
    ('<tool_call>{"name": "add", "parameters": {"a": 1, "b": 2}}</tool_call>', None, [("add", {"a": 1, "b": 2})]),
    (CALL, None, [("get_weather", PARIS)]),
    (f"[{CALL}, {CALL}]", None, [("get_weather", PARIS)] * 2),
    (f"Sure! {CALL} Done.", "Sure!\nDone.", [("get_weather", PARIS)]),
    (f"Here:\n```json\n{CALL}\n```", "Here:", [("get_weather", PARIS)]),
    (f'<tool_call>{CALL}</tool_call> and <tool_call>{{"name": "sub", "arguments": {{}}}}</tool_call>',
     'and <tool_call>{"name": "sub", "arguments": {}}</tool_call>', [("get_weather", PARIS)]),
])
def test_parse_calls(text, content, calls):
    out = parse_tool_calls(text, NAMES)
    assert out.content == content and calls_of(out) == calls


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    '<tool_call>{"name": "sub", "arguments": {}}</tool_call>',           # unknown tool
    '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>',      # invalid JSON
    '<tool_call>{"name": "add", "arguments": "a=1"}</tool_call>',        # arguments not an object
    '{"a": 1} and [1, 2]',                                              # JSON that is no call
    '{"name": "get_weather", "arguments": {"city": "Paris"}',           # unclosed bare JSON
])
def test_output_that_is_no_call_stays_content(text):
    out = parse_tool_calls(text, NAMES)
    assert out.content == text and out.tool_calls == []


def test_parse_output_by_mode():
    assert parse_output(CALL, tool_plan(TOOLS, "none")).content == CALL
    assert len(parse_tool_calls(f"[{CALL}, {CALL}]", NAMES, parallel=False).tool_calls) == 1
    named = parse_output(' {"a": 3, "b": 4}', tool_plan(TOOLS, {"type": "function", "function": {"name": "add"}}))
    assert named.content is None and calls_of(named) == [("add", {"a": 3, "b": 4})]
    required = parse_output(f'[{CALL}, {{"name": "add", "arguments": {{"a": 1, "b": 2}}}}]',
                            tool_plan(TOOLS, "required"))
    assert required.content is None and calls_of(required) == [("get_weather", PARIS), ("add", {"a": 1, "b": 2})]
    cut = f"[{CALL}, {{\"name\": \"add\", \"argu"  # stopped by max_tokens
    assert parse_output(cut, tool_plan(TOOLS, "required")).content == cut
    assert tool_finish_reason("stop", required.tool_calls) == "tool_calls"
    assert tool_finish_reason("length", required.tool_calls) == "length" and tool_finish_reason("stop", []) == "stop"


def test_stream_sends_text_until_a_call_may_begin_and_the_calls_at_the_end():
    text = f"Let me check <tools> first.\n<tool_call>{CALL}</tool_call>"
    stream = ToolStream(tool_plan(TOOLS))
    sent = "".join(stream.feed(ch) for ch in text)
    assert sent == "Let me check <tools> first.\n"  # "<tool" was held back until it was not a tag
    rest = stream.close()
    assert rest.content is None and calls_of(rest) == [("get_weather", PARIS)]
    delta = stream_tool_calls(rest.tool_calls)
    assert delta == [{"index": 0, **rest.tool_calls[0]}]
    plain = ToolStream(tool_plan(TOOLS))
    assert "".join(plain.feed(ch) for ch in "No call {here}.") == "No call " and plain.close().content == "{here}."
    none = ToolStream(tool_plan(TOOLS, "none"))
    assert none.feed(CALL) == CALL and none.close().tool_calls == []
    required = ToolStream(tool_plan(TOOLS, "required"))
    assert required.feed(f"[{CALL}]") == "" and calls_of(required.close()) == [("get_weather", PARIS)]


# ---- constrained calls on a tiny model ---------------------------------------------------------------------------


class Constrained(LogitsProcessor):
    """transformers' generate under a TokenConstraint: advance by the token just taken, mask the next."""

    def __init__(self, constraint, prompt_len: int) -> None:
        self.constraint, self.prompt_len = constraint, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # [1, T], [1, V]
        if input_ids.shape[1] > self.prompt_len:
            self.constraint.advance(int(input_ids[0, -1]))
        return scores.masked_fill(~self.constraint.allowed(), float("-inf"))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools_lm")
    vocab = len(make_tokenizer(root / "tokenizer"))
    model = make_base(root / "base", vocab_size=vocab + 32, max_position_embeddings=1024)
    tok = AutoTokenizer.from_pretrained(root / "base")
    return model, tok, StructuredCompiler(tok, model.config.vocab_size)


def constrained_text(lm, plan, seed: int | None, constrain: bool = True) -> str:
    model, tok, compiler = lm
    messages, tools = prompt_messages(tok, [{"role": "user", "content": "what is two plus three"}], plan)
    ids = torch.tensor([tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)["input_ids"]])
    keep = [Constrained(compiler.constraint(constraint_spec(plan)), ids.shape[1])] if constrain else []
    sampling = {"do_sample": False} if seed is None else {"do_sample": True, "top_k": 0, "temperature": 1.0}
    torch.manual_seed(seed or 0)
    out = model.generate(ids, max_new_tokens=400 if constrain else 40, logits_processor=LogitsProcessorList(keep),
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sampling)
    assert out[0, -1] == tok.eos_token_id or not constrain, "the constrained output did not end"
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def valid_calls(out, plan) -> list[tuple[str, dict]]:
    calls = calls_of(out)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in plan.tools}
    for name, args in calls:
        jsonschema.validate(args, schemas[name])
    return calls


@pytest.mark.parametrize("seed, parallel", [(None, False), (0, False), (0, True), (1, True), (2, True)])
def test_required_yields_calls_of_the_tools(lm, seed, parallel):
    """(Greedy decoding of a random model repeats itself: with parallel calls it would never close the array.)"""
    plan = tool_plan(TOOLS, "required", parallel_tool_calls=parallel)
    text = constrained_text(lm, plan, seed)
    out = parse_output(text, plan)
    calls = valid_calls(out, plan)
    assert out.content is None and calls and {n for n, _ in calls} <= set(NAMES), text
    assert parallel or len(calls) == 1


def test_unconstrained_output_is_no_call(lm):
    plan = tool_plan(TOOLS, "required")
    assert parse_output(constrained_text(lm, plan, None, constrain=False), plan).tool_calls == []


@pytest.mark.parametrize("seed", [None, 0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_named_function_yields_its_arguments(lm, seed, name):
    plan = tool_plan(TOOLS, {"type": "function", "function": {"name": name}})
    out = parse_output(constrained_text(lm, plan, seed), plan)
    assert [n for n, _ in valid_calls(out, plan)] == [name]
