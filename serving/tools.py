"""OpenAI tools (function calling) for chat completions, as vLLM does it: prompt, constraint, parser.

- The prompt: tools go to the model through the tokenizer's chat template (`apply_chat_template(messages,
  tools=[...])`, OpenAI's function format). A template that ignores tools (its rendering does not change when
  tools are passed) gets them as a system message instead, Hermes style (FALLBACK_PROMPT: the tools as JSON
  in `<tools></tools>`, calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), and the history is
  rewritten to that format: an assistant turn's `tool_calls` become `<tool_call>` blocks of its content, `tool`
  results become a user turn of `<tool_response>` blocks.
- `tool_choice`: "none": no tools in the prompt, the output is plain text. "auto" (the default with tools): the
  model decides, its output is parsed (`parse_tool_calls`). "required": the output is constrained to a JSON array
  of one or more calls `[{"name": ..., "arguments": {...}}]` (`maxItems` 1 when `parallel_tool_calls` is false),
  each item's `name` the enum of one tool and `arguments` that tool's parameters schema. A named function
  `{"type": "function", "function": {"name": N}}`: the output is constrained to N's parameters schema and is N's
  arguments.
- The output: `parse_output` gives (content, tool_calls) in OpenAI's shape, `tool_calls` being
  `[{"id": "call_...", "type": "function", "function": {"name": ..., "arguments": "<JSON text>"}}]`.

How to integrate (the chat request handler):

    plan = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)  # ValueError -> 400 (param "tools")
    spec = constraint_spec(plan)           # StructuredSpec or None; ValueError (a bad parameters schema) -> 400
    messages, tools = prompt_messages(tokenizer, body.chat(), plan)
    # generate from `messages` with `tools` passed to the template (GenerationRequest.tools) and
    # `structured=spec` (a request that also asks for response_format with required/named is a 400)
    out = parse_output(final_text, plan)   # out.content (None when only calls), out.tool_calls (a list)
    message = {"role": "assistant", "content": out.content, **({"tool_calls": out.tool_calls} if out.tool_calls
               else {})}; finish_reason = tool_finish_reason(reason, out.tool_calls)

Streams: with "none" stream text as usual. Otherwise feed each text delta to a `ToolStream(plan)`: `feed(delta)`
returns the content that may go out now (text that cannot start a call; with required/named nothing), `close()`
the rest of the content and the calls at the end; send the calls as one delta,
`{"tool_calls": stream_tool_calls(calls)}`: each call whole, with its `index`, which OpenAI clients accept.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from twinrt.runtime.structured import StructuredSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
FALLBACK_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

Mode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools, validated: `tools` in OpenAI's function format (parameters filled in), `mode` from
    tool_choice, `name` the forced function (mode "named"), `parallel` whether several calls may be made."""

    tools: tuple[dict[str, Any], ...] = ()
    mode: Mode = "none"
    name: str | None = None
    parallel: bool = True

    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)

    def parameters(self, name: str) -> dict[str, Any]:
        return next(t["function"]["parameters"] for t in self.tools if t["function"]["name"] == name)


@dataclass(frozen=True)
class ToolOutput:
    content: str | None                                  # None when the output was only tool calls
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


# ---- validation --------------------------------------------------------------------------------------------------


def check_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI's `tools`: a list of {"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}, names unique and of [A-Za-z0-9_.:-]{1,64}. Returns them with `parameters` filled in (an empty
    object schema where absent). ValueError names what is wrong."""
    if not isinstance(tools, list):
        raise ValueError("'tools' must be a list of {'type': 'function', 'function': {...}} objects")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}]: only tools of type 'function' are supported")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not NAME_PATTERN.match(fn["name"]):
            raise ValueError(f"tools[{i}].function needs a 'name' of 1 to 64 letters, digits, '_', '.', ':' or '-'")
        if fn["name"] in seen:
            raise ValueError(f"tools[{i}]: the function name {fn['name']!r} is given twice")
        if not isinstance(fn.get("description", ""), str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        params = fn.get("parameters") or EMPTY_PARAMETERS
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema of an object")
        seen.add(fn["name"])
        out.append({"type": "function", "function": {**fn, "parameters": dict(params)}})
    return tuple(out)


def tool_plan(tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None) -> ToolPlan:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls`, checked (OpenAI's and vLLM's rules):
    tool_choice defaults to "auto" with tools and "none" without; "auto", "required" and a named function need
    tools; the named function must be one of them; "required" with an empty list is "none". ValueError if not."""
    checked = check_tools(tools) if tools is not None else ()
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        tool_choice = "auto" if checked else "none"
    if tool_choice == "none":
        return ToolPlan(checked, "none", parallel=parallel)
    if tools is None:
        raise ValueError("'tool_choice' other than 'none' needs 'tools'")
    if tool_choice == "required" and not checked:
        return ToolPlan((), "none", parallel=parallel)
    if tool_choice in ("auto", "required"):
        return ToolPlan(checked, tool_choice, parallel=parallel)
    if not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function":
        raise ValueError("'tool_choice' must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("a named 'tool_choice' needs {'type': 'function', 'function': {'name': ...}}")
    plan = ToolPlan(checked, "named", name, parallel)
    if name not in plan.names():
        raise ValueError(f"'tool_choice' names the function {name!r}, which is not in 'tools'")
    return plan


# ---- constrained decoding ----------------------------------------------------------------------------------------


def _hoist_defs(schemas: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each schema without its `$defs`, and all of them merged (a `#/$defs/...` reference then resolves from the
    root of the combined schema). ValueError if two tools define one name differently."""
    defs: dict[str, Any] = {}
    out = []
    for s in schemas:
        own = s.get("$defs") or {}
        for k, v in own.items():
            if defs.setdefault(k, v) != v:
                raise ValueError(f"tools define '$defs/{k}' differently; give it one schema")
        out.append({k: v for k, v in s.items() if k != "$defs"})
    return out, defs


def calls_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON schema of tool_choice "required": an array of one or more {"name", "arguments"}, each item one
    tool's name (an enum of one) with that tool's parameters schema (`maxItems` 1 unless parallel)."""
    params, defs = _hoist_defs([plan.parameters(n) for n in plan.names()])
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]}, "arguments": p},
              "required": ["name", "arguments"]} for n, p in zip(plan.names(), params)]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not plan.parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def constraint_spec(plan: ToolPlan) -> StructuredSpec | None:
    """The decode-time constraint of the plan: "required" -> `calls_schema`, named -> the function's parameters
    schema, else None. ValueError (from StructuredSpec) if a parameters schema does not compile."""
    if plan.mode == "required":
        return StructuredSpec("json", calls_schema(plan))
    if plan.mode == "named":
        return StructuredSpec("json", plan.parameters(plan.name or ""))
    return None


# ---- the prompt --------------------------------------------------------------------------------------------------

_PROBE_MESSAGES = [{"role": "user", "content": "hi"}]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_tool_7f3a", "description": "probe",
                                                  "parameters": EMPTY_PARAMETERS}}]
_USES_TOOLS: dict[str, bool] = {}


def template_uses_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools: a conversation rendered with a probe tool differs from
    the same rendered without it (cached per template). A template that fails with tools does not use them."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    if template not in _USES_TOOLS:
        try:
            plain = tokenizer.apply_chat_template(_PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
            with_tools = tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=_PROBE_TOOLS, tokenize=False,
                                                       add_generation_prompt=True)
            _USES_TOOLS[template] = plain != with_tools
        except Exception:  # noqa: BLE001 - any template error: render without tools (the fallback)
            _USES_TOOLS[template] = False
    return _USES_TOOLS[template]


def _arguments_dict(arguments: Any) -> Any:
    """A call's arguments as templates expect them: a dict (OpenAI sends JSON text; text that is not JSON stays)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments
    return {} if arguments is None else arguments


def _template_history(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools: assistant tool_calls' arguments as dicts (as vLLM passes them)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c.get("function", {}),
                                                  "arguments": _arguments_dict(c.get("function", {}).get("arguments"))}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def fallback_system_prompt(plan: ToolPlan) -> str:
    """The Hermes-style system text that lists the tools (one JSON object a line) and the call format."""
    return FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools))


def _call_block(call: Mapping[str, Any]) -> str:
    fn = call.get("function", {})
    body = {"name": fn.get("name"), "arguments": _arguments_dict(fn.get("arguments"))}
    return f"{CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CALL_CLOSE}"


def _fallback_history(messages: Sequence[Mapping[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """The conversation in plain roles: the tools prompt in the system message (appended to a first system
    message, else a new one), tool_calls as `<tool_call>` blocks, each run of tool results as one user turn."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = "\n".join([content] * bool(content) + [_call_block(c) for c in m["tool_calls"]])
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")})
    system = fallback_system_prompt(plan)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{system}" if out[0]["content"] else system
    else:
        out.insert(0, {"role": "system", "content": system})
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def prompt_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                    plan: ToolPlan) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render with `apply_chat_template(messages, tools=tools)`. Mode "none" or no tools:
    the messages as they are and no tools; a template that renders tools: the messages (arguments as dicts) and
    the tools; otherwise the fallback conversation (`_fallback_history`) and no tools."""
    if plan.mode == "none" or not plan.tools:
        return [dict(m) for m in messages], None
    if template_uses_tools(tokenizer):
        return _template_history(messages), list(plan.tools)
    return _fallback_history(messages, plan), None


# ---- parsing the output ------------------------------------------------------------------------------------------

_TAGGED = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)
_FENCE_OPEN = re.compile(r"```[A-Za-z]*\s*\Z")  # searched up to a call's start
_FENCE_CLOSE = re.compile(r"\s*```")  # matched at a call's end
_JSON_START = re.compile(r"[{\[]")
_DECODER = json.JSONDecoder()


def make_call(name: str, arguments: str) -> dict[str, Any]:
    """One OpenAI tool call; `arguments` is JSON text, as OpenAI sends it."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _as_call(value: Any, names: Sequence[str]) -> dict[str, Any] | None:
    """{"name": N, "arguments": {...}} (or "parameters", or arguments as JSON text) with N a known tool, as a call;
    anything else None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return make_call(value["name"], json.dumps(args, ensure_ascii=False))


def _as_calls(value: Any, names: Sequence[str]) -> list[dict[str, Any]] | None:
    """A call, or a non-empty list of calls, as calls (None unless every one is a call)."""
    items = value if isinstance(value, list) and value else [value]
    calls = [_as_call(v, names) for v in items]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def _json_calls(text: str, names: Sequence[str]) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
    """The (start, end) spans of text that are JSON calls (an object or a list of them) and those calls, scanning
    left to right; JSON that is not a call is skipped whole."""
    spans, calls, i = [], [], 0
    while (m := _JSON_START.search(text, i)) is not None:
        try:
            value, end = _DECODER.raw_decode(text, m.start())
        except ValueError:
            i = m.start() + 1
            continue
        found = _as_calls(value, names)
        if found is not None:
            spans.append((m.start(), end))
            calls += found
        i = end
    return spans, calls


def _fenced(text: str, a: int, b: int) -> tuple[int, int]:
    """The span text[a:b] widened to the code fence (```json ... ```) around it, if it stands alone in one."""
    before, after = _FENCE_OPEN.search(text, 0, a), _FENCE_CLOSE.match(text, b)
    return (before.start(), after.end()) if before and after else (a, b)


def _cut(text: str, spans: Sequence[tuple[int, int]]) -> str | None:
    """The text outside the spans (and the code fences around them), each piece stripped, joined by newlines;
    None if nothing is left."""
    edges = [0, *(i for a, b in spans for i in _fenced(text, a, b)), len(text)]
    pieces = (text[a:b].strip() for a, b in zip(edges[::2], edges[1::2]))
    return "\n".join(p for p in pieces if p) or None


def parse_tool_calls(text: str, names: Sequence[str], parallel: bool = True) -> ToolOutput:
    """The model's free output (tool_choice "auto") as content and calls. Calls are `<tool_call>...</tool_call>`
    blocks (the last one may be unclosed) holding {"name", "arguments"} JSON, or, where the text has no such
    tag, bare JSON objects (or lists) of that shape anywhere in it. A block whose JSON does not parse or names no
    known tool stays in the content as it is. The content is the rest of the text (`_cut`; None if empty).
    With `parallel` false only the first call is kept."""
    if CALL_OPEN in text:
        spans, calls = [], []
        for m in _TAGGED.finditer(text):
            try:
                found = _as_calls(json.loads(m.group(1)), names)
            except ValueError:
                found = None
            if found is not None:
                spans.append(m.span())
                calls += found
    else:
        spans, calls = _json_calls(text, names)
    if not calls:
        return ToolOutput(text, [])
    return ToolOutput(_cut(text, spans), calls[:1] if not parallel else calls)


def parse_output(text: str, plan: ToolPlan) -> ToolOutput:
    """The final text of a completion under the plan: "none" -> all content; "auto" -> `parse_tool_calls`;
    named -> one call of that function whose arguments are the text (as generated: a completion cut by max_tokens
    has incomplete JSON there, as OpenAI's can); "required" -> the calls of the JSON array (text that does not
    parse as one, e.g. cut by max_tokens, stays content)."""
    if plan.mode == "none":
        return ToolOutput(text, [])
    if plan.mode == "auto":
        return parse_tool_calls(text, plan.names(), plan.parallel)
    if plan.mode == "named":
        return ToolOutput(None, [make_call(plan.name or "", text.strip())])
    try:
        calls = _as_calls(json.loads(text), plan.names())
    except ValueError:
        calls = None
    return ToolOutput(None, calls) if calls else ToolOutput(text, [])


def tool_finish_reason(reason: str, tool_calls: Sequence[Any]) -> str:
    """OpenAI's finish_reason: "tool_calls" when a completion that stopped by itself made calls."""
    return "tool_calls" if tool_calls and reason == "stop" else reason


def stream_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The `tool_calls` of a stream's delta: every call whole, with its `index` (the position among the calls)."""
    return [{"index": i, **c} for i, c in enumerate(tool_calls)]


def _start_of_call(text: str) -> int:
    """Where a call may begin in text: the first `{`, `[` or `<tool_call>`, or a trailing prefix of that tag."""
    cands = [i for i in (text.find("{"), text.find("["), text.find(CALL_OPEN)) if i >= 0]
    cands += [len(text) - k for k in range(len(CALL_OPEN) - 1, 0, -1) if text.endswith(CALL_OPEN[:k])][:1]
    return min(cands, default=len(text))


class ToolStream:
    """A streamed completion under a plan: `feed(delta)` -> content to send now, `close()` -> the rest (content,
    calls). Mode "none" passes text through. "auto" sends text up to where a call may begin (`{`, `[` or
    `<tool_call>`) and holds the rest, parsed at the end; required / named hold everything. The content sent plus
    the rest's is `parse_output`'s content, up to whitespace where the two meet."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan, self.text, self.sent = plan, "", 0

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.plan.mode == "none":
            safe = len(self.text)
        elif self.plan.mode == "auto":
            safe = max(self.sent, _start_of_call(self.text))
        else:
            return ""
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def close(self) -> ToolOutput:
        held = self.text[self.sent:]
        return parse_output(held, self.plan) if held else ToolOutput(None, [])
