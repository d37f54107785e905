"""What a request is: its prompt's tokens, sampling parameters, and the state of its generation.

    req = Request(id, encode_prompt(tokenizer, prompt), mix, SamplingParams(max_new_tokens=64), on_token)
    # the engine appends to req.output_ids and req.text, then sets req.finish_reason (and req.error)

`encode_prompt` and `end_ids` are the tokenization rules every backend shares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

Prompt = str | Sequence[Mapping[str, str]]


def encode_prompt(tok, prompt: Prompt) -> list[int]:
    """Token ids of a prompt with a transformers tokenizer: a string as is (with the tokenizer's special
    tokens), chat messages through the chat template with a generation prompt. Every backend encodes this way,
    so the same request is the same tokens on each."""
    if isinstance(prompt, str):
        ids = tok(prompt)["input_ids"]
    else:
        messages = list(prompt)
        if not messages or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
            raise ValueError("chat prompts must be a non-empty list of {'role', 'content'} messages")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("prompt is empty (no tokens)")
    return ids


def end_ids(generation_eos: int | Sequence[int] | None, tok) -> set[int]:
    """The token ids that end a generation: the generation config's eos id(s) and the tokenizer's. Every backend
    stops on the same set, so the same request ends at the same token on each."""
    ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return set(ids)


TokenCallback = Callable[["Request", str], None]


@dataclass(frozen=True)
class SamplingParams:
    """How a request samples and when it ends; validated on construction (ValueError)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # below sampling.SAMPLING_EPS: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # as vLLM's: an end-of-sequence token does not finish the row (benchmarks)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")


@dataclass(frozen=True)
class RowFailure:
    """Why a row failed. `client`: the request's own input caused it (a server answers 400), else the failure is
    internal (500). `message` is safe to show the client (exception types only, no internal text)."""

    message: str
    client: bool


@dataclass(eq=False)
class Request:
    """One generation: the engine's handle, updated as tokens come and read by whoever submitted it."""

    id: int
    prompt_ids: list[int]
    mix: torch.Tensor | None  # [N] or None (core only)
    params: SamplingParams
    on_token: TokenCallback | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: RowFailure | None = None  # set with finish_reason "error"
    emitted: int = 0  # characters of `text` already streamed
    generator: torch.Generator | None = None
    cancelled: bool = False
    deadline: float | None = None  # time.perf_counter() past which its caller gives up on it (None: never)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)
