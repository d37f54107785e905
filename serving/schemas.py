"""Request bodies of the OpenAI API, with vLLM's extensions, as this server reads them, validated once at the
boundary.

Known fields are typed and range-checked (a bad value is a 400 naming the field). Every field of vLLM's chat
and completion request models is either typed here (honoured, with vLLM's semantics) or in UNSUPPORTED: sent
at a value other than its neutral one, such a field is refused with a 400 naming it, never ignored. Fields
that neither OpenAI nor vLLM define are accepted and ignored, as vLLM does. The request extension `routing`
(see serving.routing) is checked strictly: a typo there is an error, not a silent no-op.

Every string in a body, keys included, must be valid Unicode (no lone UTF-16 surrogates such as "\\ud800",
which JSON can carry but no tokenizer, router or log can encode): refused as a 400 naming the field, before
anything else sees the request.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from twinrt.validation import Frozen

MAX_N = 64
MAX_STOP = 16
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI (and vLLM) default of /v1/completions

MAX_WEIGHT = 100.0  # a mix weight scales an expert's whole delta; far beyond this the model's output overflows
INVALID_TEXT = "invalid_unicode"  # the pydantic error type of a string that is not valid Unicode

PosInt = Annotated[int, Field(strict=True, ge=1)]
Weight = Annotated[float, Field(strict=True, ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]


def invalid_text(value: Any, path: str = "") -> tuple[str, int] | None:
    """(the dotted path, the character offset) of the first string in `value` (keys included) that is not valid
    Unicode, i.e. holds a lone surrogate; None if every string is valid."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, e.start
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            key = str(k).encode("utf-8", "backslashreplace").decode("utf-8")  # a path that can be shown
            sub = f"{path}.{key}" if path else key
            found = invalid_text(k, sub) if isinstance(k, str) else None
            found = found or invalid_text(v, sub)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = invalid_text(v, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None

# Fields of the OpenAI API and vLLM's extensions that this server does not implement -> the values that mean
# "not used" (sent at one of these, a field is accepted; otherwise a 400 names it). Every field of vLLM's request
# models is either typed below (honoured) or listed here; tests/test_serving_fields.py walks vLLM's models.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),          # the models served here have no reasoning mode
    "include_reasoning": (None, True),
    "thinking_token_budget": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "watermarking": (None,),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "truncation_side": (None,),
    "allowed_token_ids": (None,),
    "logprob_token_ids": (None,),
    "bad_words": (None, []),
    "prompt_embeds": (None,),
    "documents": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "media_io_kwargs": (None, {}),
    "mm_processor_kwargs": (None, {}),
    "mm_payload": (None, "tensors"),
    "return_mm_kwargs": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "priority": (None, 0),
    "session_id": (None,),
    "routed_experts_prompt_start": (None, 0),
    "return_token_offsets": (None, False),
    "return_prompt_text": (None, False),
    "cache_salt": (None,),
    "kv_transfer_params": (None,),
    "ec_transfer_params": (None,),
    "vllm_xargs": (None, {}),
    "repetition_detection": (None,),
    "stream_interval": (None, 1),
    "logits_processors": (None, []),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
}
CHAT_UNSUPPORTED = {"echo": (None, False), "add_special_tokens": (None, False)}  # chat's own neutral values
COMPLETION_UNSUPPORTED = {"add_special_tokens": (None, True), "tools": (None, []), "tool_choice": (None, "none"),
                          "parallel_tool_calls": (None, True, False)}


class RoutingOverride(Frozen):
    """`"routing": {"weights": {"math": 0.7, "code": 0.3}}` or `"routing": {"expert": "math"}`.

    Weights are the mix as given (≥ 0, not renormalised; missing experts are 0; all zero = the core)."""

    weights: dict[str, Weight] | None = None
    expert: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RoutingOverride:
        if (self.weights is None) == (self.expert is None):
            raise ValueError("routing needs exactly one of 'weights' (a {expert: weight} object) or 'expert'")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: every chunk carries the usage so far


MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI's top_logprobs allows 20 too
MAX_BIAS = 100.0
Penalty = Annotated[float, Field(strict=False, ge=-2, le=2, allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
TopLogprobs = Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)]


class ResponseFormat(Frozen):
    """`response_format`: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"?, "description"?}} (OpenAI's shape; vLLM's "structural_tag" is not implemented)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema":
            inner = self.json_schema or {}
            if not isinstance(inner.get("schema", {}), dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        elif self.json_schema is not None:
            raise ValueError(f"response_format of type {self.type!r} takes no json_schema")
        return self


class StructuredOutputs(Frozen):
    """vLLM's `structured_outputs` object: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: None = None
    structural_tag: None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object")
        return self


class _Request(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(frozen=True, extra="allow")
    _unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: Annotated[str, Field(min_length=1)]
    max_tokens: PosInt | None = None
    temperature: Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(strict=True, ge=SEED_MIN, le=SEED_MAX)] | None = None
    user: str | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    routing: RoutingOverride | None = None
    request_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")] | None = None
    # sampling, with vLLM's semantics (twinrt.runtime.request.SamplingParams)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(strict=False, gt=0, le=10, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(strict=True, ge=-1)] | None = None
    min_p: Annotated[float, Field(strict=False, ge=0, le=1, allow_inf_nan=False)] | None = None
    min_tokens: NonNegInt = 0
    logit_bias: dict[str, Annotated[float, Field(allow_inf_nan=False)]] | None = None
    stop_token_ids: Annotated[list[NonNegInt], Field(max_length=1024)] | None = None
    include_stop_str_in_output: Annotated[bool, Field(strict=True)] = False
    ignore_eos: Annotated[bool, Field(strict=True)] = False  # vLLM's extra parameter: decode past end-of-sequence
    prompt_logprobs: TopLogprobs | None = None
    return_tokens_as_token_ids: Annotated[bool, Field(strict=True)] | None = None
    return_token_ids: Annotated[bool, Field(strict=True)] | None = None
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = invalid_text(data)
        if found is not None:
            path, at = found
            raise PydanticCustomError(INVALID_TEXT, "the text is not valid Unicode (a lone surrogate at character "
                                      "{at}); send UTF-8 text", {"param": path or None, "at": at})
        return data

    @model_validator(mode="after")
    def _supported(self) -> _Request:
        extra = self.model_extra or {}
        for key, neutral in {**UNSUPPORTED, **self._unsupported}.items():
            value = extra.get(key)
            if value not in neutral or (isinstance(value, bool) and not any(v is value for v in neutral)):
                raise ValueError(f"'{key}' is not supported by this server (send it unset or at its default)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids (strings of digits), got {token!r}")
            if abs(bias) > MAX_BIAS:
                raise ValueError(f"logit_bias values must be within [-100, 100], got {bias}")
        if len(self.structured()) > 1:
            raise ValueError("give at most one of response_format (json), structured_outputs and guided_*")
        return self

    def max_completion(self) -> int | None:
        return self.max_tokens

    def stops(self) -> tuple[str, ...]:
        """Stop strings (empty ones dropped: they cannot end a completion)."""
        raw = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in raw if s)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats: every chunk's `usage` is the usage so far (with include_usage)."""
        return self.include_usage() and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs."""
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    def structured(self) -> list[tuple[str, Any]]:
        """The decode-time constraints asked for, as (kind, value) with kind json | regex | choice | grammar
        (json_object is the schema {"type": "object"}); at most one is allowed."""
        found: list[tuple[str, Any]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("json", {"type": "object"}))
        elif rf is not None and rf.type == "json_schema":
            found.append(("json", (rf.json_schema or {}).get("schema", {})))
        so = self.structured_outputs
        if so is not None:
            for kind, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                ("grammar", so.grammar), ("json", {"type": "object"} if so.json_object else None)):
                if value is not None:
                    found.append((kind, value))
        for kind, value in (("json", self.guided_json), ("regex", self.guided_regex), ("choice", self.guided_choice),
                            ("grammar", self.guided_grammar)):
            if value is not None:
                found.append((kind, value))
        return found

    def top_logprobs_k(self) -> int | None:
        """How many top logprobs per generated token (None: no logprobs)."""
        raise NotImplementedError


class Message(BaseModel):
    """One chat message. Assistant messages may carry `tool_calls` and tool messages `tool_call_id`, passed to
    the chat template as OpenAI gives them."""

    model_config = ConfigDict(frozen=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p["text"] for p in self.content)
        return self.content or ""

    def as_dict(self) -> dict[str, Any]:
        """{"role", "content": str} plus tool_calls / tool_call_id / name where given ("developer" read as
        "system")."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Request):
    _unsupported: ClassVar[dict[str, tuple[Any, ...]]] = CHAT_UNSUPPORTED

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PosInt | None = None
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: Annotated[bool, Field(strict=True)] | None = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def max_completion(self) -> int | None:
        """max_completion_tokens (the current name) if given, else max_tokens; None = up to the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> tuple[dict[str, Any], ...]:
        """Messages as {"role", "content": str, ...} (text parts joined by newlines; see Message.as_dict)."""
        return tuple(m.as_dict() for m in self.messages)

    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]
MAX_PROMPTS = 1024


class CompletionRequest(_Request):
    _unsupported: ClassVar[dict[str, tuple[Any, ...]]] = COMPLETION_UNSUPPORTED

    prompt: Any
    max_tokens: NonNegInt | None = None  # 0: no completion (with echo: scoring the prompt alone)
    logprobs: TopLogprobs | None = None
    echo: Annotated[bool, Field(strict=True)] = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> tuple[str | tuple[int, ...], ...]:
        """A string, a list of strings, a list of token ids, or a list of token-id lists -> one entry each."""
        if isinstance(v, str):
            return (v,)
        if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return (cls._ids(v),)
        if isinstance(v, list) and v and len(v) <= MAX_PROMPTS:
            if all(isinstance(x, str) for x in v):
                return tuple(v)
            if all(isinstance(x, list) for x in v):
                return tuple(cls._ids(x) for x in v)
        raise ValueError(f"prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                         f"lists (non-empty, at most {MAX_PROMPTS} prompts)")

    @staticmethod
    def _ids(v: list[Any]) -> tuple[int, ...]:
        if not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            raise ValueError("a token-id prompt must be a non-empty list of non-negative integers")
        return tuple(v)

    def max_completion(self) -> int | None:
        return COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def top_logprobs_k(self) -> int | None:
        return self.logprobs
