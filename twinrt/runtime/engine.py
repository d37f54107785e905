"""Batched generation with continuous batching: requests join and leave a running batch between decode steps.

One `Engine.step()` decodes one token for every running row (each row with its own mix) and admits waiting
requests: they are prefilled together, their KV cache is left-padded and joined to the running one. Finished
rows (EOS, a stop string, max_new_tokens, the context length, or a cancel) leave the batch at once.
The engine is single-threaded; a server drives `step()` from one worker thread.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from twinrt.runtime import cache_ops
from twinrt.runtime.sampling import sample_next

if TYPE_CHECKING:
    from twinrt.runtime.model import TwinModel

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
    max_new_tokens: int = 64
    temperature: float = 0.0
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


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    mix: torch.Tensor | None  # [N] or None (core only)
    params: SamplingParams
    on_token: TokenCallback | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    emitted: int = 0  # characters of `text` already streamed
    generator: torch.Generator | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might begin a stop string (or an unfinished UTF-8 sequence)."""
    n = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


class Engine:
    """Continuous-batching generation over a TwinModel."""

    def __init__(self, tm: TwinModel, max_batch: int = 64, materialize: bool = True) -> None:
        self.tm = tm
        self.max_batch = max_batch
        self.materialize = materialize
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, L] attention mask of the running rows
        self._next: torch.Tensor | None = None  # [B] the token each running row feeds next
        self._ids = itertools.count()
        self.eos = end_ids(tm.model.generation_config.eos_token_id, tm.tokenizer)
        self.context = int(getattr(tm.config, "max_position_embeddings", 2048))

    # ---- requests --------------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat messages go through the chat template with a generation prompt."""
        return encode_prompt(self.tm.tokenizer, prompt)

    def add(self, prompt: Prompt | list[int], mix: torch.Tensor | None, params: SamplingParams,
            on_token: TokenCallback | None = None) -> Request:
        """Queue a request; `mix` is a validated [N] row (None or all zeros = core)."""
        ids = list(prompt) if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) else self.encode(prompt)
        if len(ids) >= self.context:
            raise ValueError(f"prompt has {len(ids)} tokens; the context length is {self.context}")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        req = Request(next(self._ids), ids, None if mix is None or not bool(mix.any()) else mix, params, on_token,
                      generator=gen)
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away); its row leaves the batch at the next step."""
        req.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def run_until_done(self) -> None:
        while self.busy:
            self.step()

    # ---- the loop --------------------------------------------------------------------------------------------

    def _mix_matrix(self, reqs: list[Request]) -> torch.Tensor | None:
        if all(r.mix is None for r in reqs):
            return None
        n = len(self.tm.experts)
        return torch.stack([r.mix if r.mix is not None else torch.zeros(n) for r in reqs])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, reqs: list[Request], tokens: int):
        dev = self.tm.device
        mask = mask.to(dev)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        self.tm.set_mix(self._mix_matrix(reqs), tokens=tokens, allow_materialize=self.materialize,
                        step_tokens=ids.numel())
        try:
            with torch.no_grad():
                out = self.tm.model(input_ids=ids.to(dev), attention_mask=mask, position_ids=positions,
                                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            self.tm.state.set(None)
        return out.logits[:, -1, :].float(), out.past_key_values  # [B, V]

    def _prefill(self, reqs: list[Request]) -> tuple[torch.Tensor, object, torch.Tensor]:
        from transformers.cache_utils import DynamicCache

        width = max(r.prompt_tokens for r in reqs)
        pad = self.tm.tokenizer.pad_token_id or 0
        ids = torch.full((len(reqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - r.prompt_tokens:] = torch.tensor(r.prompt_ids)
            mask[i, width - r.prompt_tokens:] = 1
        tokens = sum(r.prompt_tokens + r.params.max_new_tokens for r in reqs)
        logits, cache = self._forward(ids, mask, DynamicCache(config=self.tm.config), reqs, tokens)
        return logits, cache, mask

    def step(self) -> list[Request]:
        """Decode one token for the running rows, then admit waiting requests. Returns requests that finished."""
        finished: list[Request] = []
        if self.running:
            reqs = self.running
            mask = torch.cat([self._mask, torch.ones(len(reqs), 1, dtype=torch.long)], dim=1)
            remaining = sum(r.params.max_new_tokens - r.completion_tokens for r in reqs)
            logits, self._cache = self._forward(self._next[:, None], mask, self._cache, reqs, remaining)
            self._mask = mask
            self._next = self._advance(reqs, logits)
        room = self.max_batch - len(self.running)
        if self.waiting and room > 0 and (self._cache is None or cache_ops.joinable(self._cache)):
            new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            logits, cache, mask = self._prefill(new)
            nxt = self._advance(new, logits)
            if self._cache is None:
                self._cache, self._mask, self._next = cache, mask, nxt
            else:
                self._cache, self._mask = cache_ops.join(self._cache, self._mask, cache, mask)
                self._next = torch.cat([self._next, nxt])
            self.running = self.running + new
        keep = [i for i, r in enumerate(self.running) if not r.done]
        finished = [r for r in self.running if r.done]
        if finished:
            if keep:
                rows = torch.tensor(keep)
                self._mask = cache_ops.keep_rows(self._cache, self._mask, rows)
                self._next = self._next.index_select(0, rows)
                self.running = [self.running[i] for i in keep]
            else:
                self._cache = self._mask = self._next = None
                self.running = []
        return finished

    def _advance(self, reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token, update its text, and finish rows that are done. -> [B] next inputs."""
        nxt = sample_next(logits, [r.params.temperature for r in reqs], [r.params.top_p for r in reqs],
                          [r.generator for r in reqs])
        for r, t in zip(reqs, nxt.tolist()):
            if r.cancelled:
                r.finish_reason = "cancelled"
                continue
            if t in self.eos and not r.params.ignore_eos:
                r.finish_reason = "stop"
            else:
                r.output_ids.append(t)
                self._update_text(r)
            if r.finish_reason is None and (r.completion_tokens >= r.params.max_new_tokens
                                            or r.prompt_tokens + r.completion_tokens >= self.context):
                r.finish_reason = "length"
            self._emit(r)
        return nxt

    def _update_text(self, r: Request) -> None:
        text = self.tm.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        for s in r.params.stop:
            at = text.find(s, max(0, r.emitted - len(s)))
            if at >= 0:
                text = text[:at]
                r.finish_reason = "stop"
        r.text = text

    def _emit(self, r: Request) -> None:
        end = len(r.text) if r.done else len(r.text) - _holdback(r.text, r.params.stop)
        if end > r.emitted:
            delta = r.text[r.emitted:end]
            r.emitted = end
            if r.on_token is not None:
                r.on_token(r, delta)
        elif r.done and r.on_token is not None:
            r.on_token(r, "")
