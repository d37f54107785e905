"""`POST /tokenize` and `POST /detokenize`, as vLLM's server has them, with the backend's own tokenizer.

    {"prompt": "text", "add_special_tokens": true}                 -> {"count", "max_model_len", "tokens",
    {"messages": [...], "add_generation_prompt": true, "tools"?}       "token_strs"}  (return_token_strs: true)
    {"tokens": [1, 2, 3]}                                          -> {"prompt": "text"}

A chat is rendered exactly as /v1/chat/completions renders it (same template, same tools), so `count` is the
prompt_tokens that request would report. `model`, when given, must name a served model (404 otherwise).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.backends.base import chat_ids
from serving.errors import APIError
from serving.schemas import Message, invalid_text

# vLLM's tokenize fields this server does not implement -> their neutral values
UNSUPPORTED = {"continue_final_message": (None, False), "chat_template": (None,), "chat_template_kwargs": (None, {}),
               "media_io_kwargs": (None, {}), "mm_processor_kwargs": (None, {})}


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: Annotated[bool, Field(strict=True)] | None = None  # prompt: True, messages: False
    add_generation_prompt: Annotated[bool, Field(strict=True)] = True
    return_token_strs: Annotated[bool, Field(strict=True)] = False
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = invalid_text(data)
        if found is not None:
            raise ValueError(f"the text is not valid Unicode (at {found[0] or 'the body'}); send UTF-8 text")
        return data

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a chat)")
        if self.prompt is not None and (self.tools or not self.add_generation_prompt):
            raise ValueError("'tools' and 'add_generation_prompt' apply to 'messages' only")
        for key, neutral in UNSUPPORTED.items():
            if (self.model_extra or {}).get(key) not in neutral:
                raise ValueError(f"'{key}' is not supported by this server (send it unset or at its default)")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    model: str | None = None
    tokens: list[Annotated[int, Field(strict=True, ge=0)]]


def check_model(server: Any, model: str | None) -> None:
    if model is not None and model not in server.arms.model_ids():
        raise APIError(404, f"The model {model!r} does not exist.", param="model", code="model_not_found")


def _tokenize(tok: Any, body: TokenizeRequest) -> list[int]:
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        return tok(body.prompt, add_special_tokens=special)["input_ids"]
    messages = [m.as_dict() for m in body.messages or []]
    if body.add_generation_prompt and not body.add_special_tokens:
        return chat_ids(tok, messages, body.tools)
    text = tok.apply_chat_template(messages, tools=body.tools, tokenize=False,
                                   add_generation_prompt=body.add_generation_prompt)
    return tok(text, add_special_tokens=bool(body.add_special_tokens))["input_ids"]


async def tokenize(server: Any, body: TokenizeRequest) -> dict[str, Any]:
    check_model(server, body.model)
    tok = server.backend.encoder.tokenizer
    try:
        ids = await asyncio.to_thread(_tokenize, tok, body)
    except (ValueError, TypeError, UnicodeError) as e:
        raise APIError(400, f"the input cannot be tokenized: {e}",
                       param="prompt" if body.prompt is not None else "messages") from None
    out: dict[str, Any] = {"count": len(ids), "max_model_len": server.backend.context, "tokens": ids,
                           "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return out


async def detokenize(server: Any, body: DetokenizeRequest) -> dict[str, Any]:
    check_model(server, body.model)
    enc = server.backend.encoder
    bad = next((t for t in body.tokens if t >= enc.vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of the vocabulary (0..{enc.vocab - 1})", param="tokens")
    return {"prompt": await asyncio.to_thread(enc.tokenizer.decode, body.tokens)}
