"""Response bodies of /v1/chat/completions and /v1/completions, whole and as SSE chunks (OpenAI's shapes).

The two endpoints differ only in names and in how a choice carries its text; `CHAT` and `COMPLETIONS` hold
those differences, everything else is shared. The routing extension is passed in as a ready dict.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    endpoint: str        # the name used in logs and metrics
    object: str
    chunk_object: str
    id_prefix: str
    choice: Callable[[int, str, str | None], dict[str, Any]]               # (index, text, finish_reason)
    chunk_choice: Callable[[int, str, str | None, bool], dict[str, Any]]   # (+ first chunk of this choice)
    message: str | None = None  # the key of a choice's message object ("message" / "delta"); None: the choice

    def extend(self, choice: dict[str, Any], fields: dict[str, Any], chunk: bool = False) -> dict[str, Any]:
        """Add message fields (tool_calls, ...) where this endpoint puts them: in the chat message (or
        delta), else on the choice itself."""
        if fields:
            (choice["delta" if chunk else "message"] if self.message else choice).update(fields)
        return choice


def _chat_choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


def _chat_chunk_choice(i: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}


def _text_chunk_choice(i: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    return _text_choice(i, text, finish)


CHAT = Shape("chat.completions", "chat.completion", "chat.completion.chunk", "chatcmpl-", _chat_choice,
             _chat_chunk_choice, message="message")
COMPLETIONS = Shape("completions", "text_completion", "text_completion", "cmpl-", _text_choice, _text_chunk_choice)


def new_id(shape: Shape) -> str:
    return shape.id_prefix + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(shape: Shape, rid: str, created: int, model: str, choices: Sequence[dict[str, Any]],
                    prompt_tokens: int, completion_tokens: int, routing: dict[str, Any],
                    **extra: Any) -> dict[str, Any]:
    """A whole (non-streamed) completion object; `prompt_tokens` counts each prompt once, whatever n is.
    `extra`: top-level fields of vLLM's extensions (prompt_logprobs, prompt_token_ids)."""
    return {"id": rid, "object": shape.object, "created": created, "model": model, "choices": list(choices),
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None, **extra,
            "routing": routing}


@dataclass
class ChunkWriter:
    """Builds the SSE events of one streamed completion; the first one carries the routing extension."""

    shape: Shape
    rid: str
    model: str
    routing: dict[str, Any]
    include_usage: bool
    created: int = 0
    _sent_first: bool = False

    def __post_init__(self) -> None:
        self.created = self.created or int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": self.rid, "object": self.shape.chunk_object, "created": self.created,
                                "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            body["usage"] = usage_
        if not self._sent_first:
            body["routing"] = self.routing
            self._sent_first = True
        return sse(body)

    def delta(self, index: int, text: str, first: bool = False, finish: str | None = None,
              logprobs: dict[str, Any] | None = None, fields: dict[str, Any] | None = None,
              so_far: dict[str, int] | None = None) -> str:
        """One choice's chunk: `first` opens the choice (chat: with the role); `fields` go in the delta (chat)
        or on the choice (completions), e.g. tool_calls or token_ids."""
        choice = self.shape.chunk_choice(index, text, finish, first)
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return self._chunk([self.shape.extend(choice, fields or {}, chunk=True)], so_far)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The final usage chunk (stream_options.include_usage): no choices."""
        return self._chunk([], usage(prompt_tokens, completion_tokens))


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
