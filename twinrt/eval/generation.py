"""Batched greedy generation for every arm through twinrt's continuous-batching `Engine`.

The twin arms run a `TwinModel`; the plain arms (original experts, static merges) run a `PlainModel`: an HF
causal LM that implements the engine's `Runner` interface with no experts. Every arm thus shares one decoding
loop (left-padded prefill, KV cache, the same EOS rule), so scores differ only by weights and tokens/s compare
like with like.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinrt.dtypes import torch_dtype
from twinrt.eval.tasks import Messages
from twinrt.runtime.engine import Engine
from twinrt.runtime.request import SamplingParams
from twinrt.runtime.runner import Runner  # a TwinModel or a PlainModel: what `generate` drives
from twinrt.sources.model import assign_weights


class PlainModel(Runner):
    """An HF causal LM (one set of weights) that `Engine` runs as a `Runner` without experts: no mix but None.

    `assign(weights)` overwrites every weight in place, so one loaded model serves every plain arm in turn.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.config = model.config
        self.experts: list[str] = []
        self.columns: list[str] = []

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = "float32") -> PlainModel:
        """Load an HF model dir (e.g. an artifact's core/, for its architecture and tokenizer)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dt, dev = torch_dtype(dtype), torch.device(device)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).to(dev).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return cls(model, tok, dev, dt)

    def set_mix(self, mix: torch.Tensor | None, tokens: int = 1, allow_materialize: bool = True,
                step_tokens: int | None = None) -> None:
        """Only "no mix" (None) can be set: there are no experts (ValueError otherwise)."""
        if mix is not None:
            raise ValueError("a plain model has no experts to mix")

    def clear_mix(self) -> None:
        """Nothing to clear: every forward runs the one set of weights."""

    def assign(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy every (name, tensor) into the model's weight of that name (`twinrt.sources.model.assign_weights`:
        the names must cover every weight, so no earlier arm's weights are left behind)."""
        assign_weights(self.model, weights)

    def weights(self) -> dict[str, torch.Tensor]:
        """A copy of every weight now loaded, by name (a tied weight once, under its first name): what
        `assign` takes back. On the model's device, in its dtype."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in self.model.state_dict().items():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                out[name] = t.detach().clone()
        return out


@dataclass(frozen=True)
class Generated:
    texts: list[str]
    tokens: int  # tokens generated in all (an EOS that ended a row counts: it was decoded too)
    seconds: float  # wall time from the first prefill to the last finished row

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def generate(runner: Runner, prompts: Sequence[Messages], mix: torch.Tensor | None = None, *,
             max_new_tokens: int, batch_size: int, on_done: Callable[[int], None] | None = None) -> Generated:
    """Greedy replies to every prompt, `batch_size` rows at a time with continuous batching.

    mix: [B, N] (one row per prompt, TwinModel only) or None (core / plain weights). `on_done(k)` is called
    as k more prompts finish.
    """
    if mix is not None and (mix.dim() != 2 or mix.shape[0] != len(prompts)
                            or mix.shape[1] not in (len(runner.experts), len(runner.columns))):
        raise ValueError(f"mix has shape {list(mix.shape)}, expected [{len(prompts)}, {len(runner.experts)}]")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    engine = Engine(runner, max_batch=batch_size)
    reqs = [engine.add([dict(m) for m in p], None if mix is None else mix[i], params) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    while engine.busy:
        finished = engine.step()
        if on_done and finished:
            on_done(len(finished))
    seconds = time.perf_counter() - t0
    tokens = sum(r.completion_tokens + (r.finish_reason == "stop") for r in reqs)
    return Generated([r.text for r in reqs], tokens, seconds)
