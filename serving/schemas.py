"""Request bodies of the OpenAI API as this server reads them, validated once at the boundary.

Known fields are typed and range-checked (a bad value is a 400 naming the field). Fields of the OpenAI API
this server does not implement are accepted at their neutral values (e.g. `presence_penalty: 0`,
`logprobs: false`) and refused with a 400 otherwise; any other unknown field is accepted and ignored, as
vLLM does. The request extension `routing` (see serving.routing) is checked strictly: a typo there is an
error, not a silent no-op.

Every string in a body, keys included, must be valid Unicode (no lone UTF-16 surrogates such as "\\ud800",
which JSON can carry but no tokenizer, router or log can encode): refused as a 400 naming the field, before
anything else sees the request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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

# fields of the OpenAI API this server does not implement -> the values that mean "not used"
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
}


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


class _Request(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(frozen=True, extra="allow")

    model: Annotated[str, Field(min_length=1)]
    max_tokens: PosInt | None = None
    temperature: Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(strict=True, ge=SEED_MIN, le=SEED_MAX)] | None = None
    ignore_eos: Annotated[bool, Field(strict=True)] = False  # vLLM's extra parameter: decode past end-of-sequence
    user: str | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    routing: RoutingOverride | None = None

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
        for key, neutral in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(key)
            if value not in neutral:
                raise ValueError(f"'{key}' is not supported by this server (send it unset or at its default)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def max_completion(self) -> int | None:
        return self.max_tokens

    def stops(self) -> tuple[str, ...]:
        """Stop strings (empty ones dropped: they cannot end a completion)."""
        raw = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in raw if s)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

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


class ChatCompletionRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PosInt | None = None

    def max_completion(self) -> int | None:
        """max_completion_tokens (the current name) if given, else max_tokens; None = up to the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> tuple[dict[str, str], ...]:
        """Messages as {"role", "content": str} (text parts joined by newlines, "developer" read as "system")."""
        return tuple({"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                     for m in self.messages)


class CompletionRequest(_Request):
    prompt: Any

    @field_validator("prompt")
    @classmethod
    def _one_text_prompt(cls, v: Any) -> str:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            raise ValueError("this server takes one prompt per request (send a batch as separate requests)")
        raise ValueError("prompt must be a string (token-id prompts are not supported)")

    def max_completion(self) -> int | None:
        return COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
