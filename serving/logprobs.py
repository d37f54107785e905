"""Logprobs in the OpenAI API's shapes (as vLLM's server writes them), from the engines' `TokenLogprob`s.

    chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
                  "refusal": None}
    completions: {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{token: logprob} | None],
                  "text_offset": [int]}            (with echo the prompt's tokens come first, the first one null)
    vLLM's prompt_logprobs: [None, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]

A token's text is `tokenizer.decode([id])` (vLLM's rule), or "token_id:<id>" with vLLM's
`return_tokens_as_token_ids`; its `bytes` are the token's own bytes (for a byte-level BPE tokenizer a token
may be part of a character, whose decoded text is U+FFFD but whose bytes are exact). Logprobs below
LOGPROB_FLOOR (or -inf) are written as LOGPROB_FLOOR, as vLLM does, since JSON has no infinities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from twinrt.runtime.request import TokenLogprob

LOGPROB_FLOOR = -9999.0


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte is one printable character; -> character -> byte.
    Printable Latin-1 bytes stand for themselves, the other 68 map to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    for k, b in enumerate(extra):
        chars[b] = chr(256 + k)
    return {c: b for b, c in chars.items()}


def _clamp(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) or logprob < LOGPROB_FLOOR else float(logprob)


class TokenText:
    """The text and bytes of token ids under one tokenizer (cached: the same ids recur on every step)."""

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        self._byte_level = decoder is not None and type(decoder).__name__ == "ByteLevel"
        self._unbyte = byte_level_alphabet()
        self.text = lru_cache(maxsize=65536)(self._text)  # type: ignore[method-assign]
        self.bytes = lru_cache(maxsize=65536)(self._bytes)  # type: ignore[method-assign]

    def _text(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        return self.tokenizer.decode([token])

    def _bytes(self, token: int) -> list[int]:
        if self._byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and all(c in self._unbyte for c in piece) and \
                    token not in self.tokenizer.all_special_ids:
                return [self._unbyte[c] for c in piece]
        return list(self.tokenizer.decode([token]).encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[TokenLogprob], tt: TokenText, top: int) -> dict[str, Any]:
    """The `logprobs` of a chat choice (or chunk) for the generated tokens `entries`, `top` alternatives each."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": tt.text(token), "logprob": _clamp(logprob), "bytes": tt.bytes(token)}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top[:top]]}
               for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob | None], tokens: Sequence[int], tt: TokenText, top: int,
                        offset: int = 0) -> tuple[dict[str, Any], int]:
    """The `logprobs` of a completions choice (or chunk): one position per token of `tokens` (entries[i] None:
    no logprob there, as the first prompt token). Each top_logprobs dict holds the token itself and its `top`
    alternatives (vLLM's rule). -> (the object, the text offset after these tokens)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, e in zip(tokens, entries):
        text = tt.text(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_clamp(e.logprob))
        alternatives = {tt.text(t): _clamp(lp) for t, lp in e.top[:top]}
        out["top_logprobs"].append({text: _clamp(e.logprob), **alternatives})
    return out, offset


def prompt_logprobs(entries: Sequence[TokenLogprob | None], tt: TokenText) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None or {"<id>": {"logprob", "rank", "decoded_token"}} for the
    token itself and its top alternatives (rank: 1-based in the model's distribution)."""
    out: list[dict[str, Any] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        row = {str(e.token): {"logprob": _clamp(e.logprob), "rank": e.rank, "decoded_token": tt.text(e.token)}}
        for rank, (t, lp) in enumerate(e.top, start=1):
            row.setdefault(str(t), {"logprob": _clamp(lp), "rank": rank, "decoded_token": tt.text(t)})
        out.append(row)
    return out
