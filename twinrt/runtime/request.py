"""What a request is: its prompt's tokens, sampling parameters, and the state of its generation.

    req = Request(id, encode_prompt(tokenizer, prompt), mix, SamplingParams(max_new_tokens=64), on_token)
    # the engine appends to req.output_ids and req.text, then sets req.finish_reason (and req.error)

`encode_prompt` and `end_ids` are the tokenization rules every backend shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from twinrt.runtime.constraint import TokenConstraint

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

MAX_LOGPROBS = 20  # the most `logprobs` / `prompt_logprobs` a request may ask for (vLLM's default max_logprobs)
MAX_BIAS = 100.0  # logit_bias values are clamped to [-MAX_BIAS, MAX_BIAS], as vLLM's OpenAI server does


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the distribution it was taken (or scored) from.

        lp = log_softmax(raw_logits.float())            # the model's logits, before any sampling processing
        logprob = lp[token];  rank = Σ_v (lp[v] >= lp[token]);  top = the k largest (id, lp), descending
    """

    token: int
    logprob: float
    rank: int  # 1-based; ties count as ranked above (vLLM's rule)
    top: tuple[tuple[int, float], ...] = ()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    """How a request samples and when it ends; validated on construction (ValueError), with vLLM's semantics.

    Logit processing, per step, in vLLM V1's order (see `logits` and `sampling`): logit_bias, the min_tokens
    mask, the constraint's mask, repetition / presence / frequency penalties, then temperature, min_p, top_k,
    top_p. Greedy (temperature < sampling.SAMPLING_EPS) takes the argmax after the penalties.
    """

    max_new_tokens: int = 64  # 0: score only (prefill, prompt_logprobs if asked, no token; finish "length")
    temperature: float = 0.0  # below sampling.SAMPLING_EPS: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # as vLLM's: an end-of-sequence token does not finish the row (benchmarks)
    top_k: int = 0  # 0 or -1: off; else keep the tokens whose logit is at least the k-th largest
    min_p: float = 0.0  # drop tokens with probability < min_p x the most likely token's (after temperature)
    min_tokens: int = 0  # until this many tokens: EOS and stop_token_ids masked, stop strings not checked
    repetition_penalty: float = 1.0  # tokens of the prompt or output: logit > 0 divided by it, else multiplied
    presence_penalty: float = 0.0  # output tokens: logit -= presence_penalty if the token occurred
    frequency_penalty: float = 0.0  # output tokens: logit -= frequency_penalty x its count
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits; bias clamped to ±100
    stop_token_ids: tuple[int, ...] = ()  # taking one ends the row ("stop"); like EOS it is not in the output
    include_stop_str_in_output: bool = False  # a stop string stays at the end of the text
    logprobs: int | None = None  # each output token's TokenLogprob, `top` of this size (0: the token alone)
    prompt_logprobs: int | None = None  # each prompt token's likewise (the first prompt token: None)

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0):  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (off) or an integer >= 1, got {self.top_k!r}")
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(f"min_tokens must be <= max_new_tokens={self.max_new_tokens}, got {self.min_tokens}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _finite(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {v!r}")
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))


def _token_ids(ids: object) -> tuple[int, ...]:
    """stop_token_ids as a tuple of ints >= 0 (any iterable of them is accepted)."""
    try:
        out = tuple(ids)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"stop_token_ids must be a sequence of token ids, got {ids!r}") from None
    if not all(_is_int(t) and t >= 0 for t in out):
        raise ValueError(f"stop_token_ids must be integers >= 0, got {list(out)!r}")
    return out


def _logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as ((token id, bias), ...): a mapping or pairs; each bias finite, clamped to ±MAX_BIAS."""
    pairs = list(bias.items()) if isinstance(bias, Mapping) else bias
    try:
        pairs = [tuple(p) for p in pairs]  # type: ignore[union-attr]
    except TypeError:
        raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
    out: list[tuple[int, float]] = []
    for pair in pairs:
        if len(pair) != 2 or not _is_int(pair[0]) or pair[0] < 0 or not _finite(pair[1]):
            raise ValueError(f"logit_bias must map token ids (integers >= 0) to finite numbers, got {pair!r}")
        out.append((pair[0], min(MAX_BIAS, max(-MAX_BIAS, float(pair[1])))))
    if len({t for t, _ in out}) != len(out):
        raise ValueError("logit_bias names a token id more than once")
    return tuple(out)


@dataclass(frozen=True)
class RowFailure:
    """Why a row failed. `client`: the request's own input caused it (a server answers 400), else the failure is
    internal (500). `message` is safe to show the client (exception types only, no internal text)."""

    message: str
    client: bool


@dataclass(eq=False)
class Request:
    """One generation: the engine's handle, updated as tokens come and read by whoever submitted it.

    `logprobs[i]` is the TokenLogprob of `output_ids[i]` (when params.logprobs is set); `prompt_logprobs[i]` that
    of `prompt_ids[i]` given `prompt_ids[:i]` ([0] is None; when params.prompt_logprobs is set, filled by the
    prefill). A streaming caller takes the output entries its delta covers with `take_logprobs()`.
    """

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
    constraint: TokenConstraint | None = None  # what may come next (structured output), see `constraint`
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, and last the EOS or stop
    #                                                             token that ended the row, if one did
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    logprobs_taken: int = 0  # entries of `logprobs` already handed out by take_logprobs
    stop_after: int = 0  # characters of `text` no stop string may end within (the first min_tokens tokens')

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def take_logprobs(self) -> list[TokenLogprob]:
        """The entries of `logprobs` not taken yet (each is handed out once, by the first call after it exists)."""
        out = self.logprobs[self.logprobs_taken:]
        self.logprobs_taken = len(self.logprobs)
        return out
