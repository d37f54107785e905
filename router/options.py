"""Routing options and the pure rule that turns a router's logits into a mix (Contract 4 of DESIGN.md).

For one row of calibrated logits `z` (the head's logits divided by the router's calibration temperature):

    p = softmax(z / temperature)                                    # "probs": what the router believes
    if no_evidence or max(p) < fallback_threshold:                  # unsure, or nothing to route on
        w = [1/N] * N            if fallback == "uniform"           # rule "fallback"
        w = [0] * N              if fallback == "core"              # the twin runs its shared core only
    else:
        w = p                                                       # rule "router"
        if top_k:      zero all but the top_k largest, renormalise  # rule "top_k" if that dropped any mass
        if min_weight: zero weights < min_weight, renormalise       # rule "min_weight" if that dropped any
                       (the row's largest weight is always kept)

top_k None (the default) is automatic: with at most AUTO_DENSE_MAX experts every weight is kept (min_weight as
given); with more, top_k = AUTO_TOP_K and min_weight = max(min_weight, AUTO_MIN_WEIGHT). A row then uses one or
two experts, and the twin's sparse mixing kernels make it pay for those alone, where a full softmax over 64
experts would make every row run every expert. An explicit top_k (top_k ≥ N: keep all) turns this off.

Every row is ≥ 0 and sums to 1, except the documented all-zero "core" fallback row. A row's `rule` is the
last rule that changed it ("router" when none did).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from twinrt.validation import Frozen

RULES = ("router", "top_k", "min_weight", "fallback")
AUTO_DENSE_MAX = 8  # the most experts a default (top_k None) mix keeps every weight of
AUTO_TOP_K = 2  # above that: the experts a default mix keeps per row
AUTO_MIN_WEIGHT = 0.05  # and the smallest weight it keeps (the row's largest always stays)
Rule = Literal["router", "top_k", "min_weight", "fallback"]


class RoutingOptions(Frozen):
    """How logits become weights; every router honours these. Validated once, then immutable."""

    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)  # divides the logits before the softmax
    top_k: int | None = Field(None, ge=1)                        # keep the k largest (k ≥ N: keep all; None: auto)
    min_weight: float = Field(0.0, ge=0, lt=1)                   # drop weights below it (largest kept)
    fallback_threshold: float = Field(0.0, ge=0, le=1)           # max prob below it -> fallback row
    fallback: Literal["uniform", "core"] = "uniform"


@dataclass(frozen=True)
class RoutingResult:
    """What a router decided for a batch, and what it based that on.

    weights: [B, N] the mix, in `experts` order   probs: [B, N] softmax(logits / temperature)
    logits:  [B, N] calibrated head logits        rules: one of RULES per row
    """

    experts: list[str]
    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    rules: list[str]

    def mixes(self) -> list[dict[str, float]]:
        """One {expert: weight} dict per row (the form `TwinModel.generate(mix=...)` accepts)."""
        return [dict(zip(self.experts, row.tolist())) for row in self.weights]

    def row(self, i: int) -> dict:
        """JSON-ready details of row `i`: weights, probs, logits (by expert name) and the rule."""
        def named(t: torch.Tensor) -> dict[str, float]:
            return {e: round(float(v), 6) for e, v in zip(self.experts, t[i])}

        return {"weights": named(self.weights), "probs": named(self.probs), "logits": named(self.logits),
                "rule": self.rules[i]}


def _renormalise(w: torch.Tensor) -> torch.Tensor:
    # w: [B, N], every row has at least one positive entry
    return w / w.sum(dim=-1, keepdim=True)


def keep_top_k(w: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest entries of each row and renormalise. w: [B, N] -> [B, N]."""
    if k >= w.shape[-1]:
        return w
    idx = w.topk(k, dim=-1).indices                      # [B, k]
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, idx, True)
    return _renormalise(w * mask)


def drop_below(w: torch.Tensor, min_weight: float) -> torch.Tensor:
    """Zero entries below `min_weight` (never a row's largest) and renormalise. w: [B, N] -> [B, N]."""
    if min_weight <= 0:
        return w
    keep = (w >= min_weight) | (w == w.max(dim=-1, keepdim=True).values)
    return _renormalise(w * keep)


def fallback_row(n: int, fallback: str) -> torch.Tensor:
    """The row used when the router is unsure: uniform 1/N, or all zeros (core only). -> [N]."""
    return torch.full((n,), 1.0 / n) if fallback == "uniform" else torch.zeros(n)


def effective_sparsity(options: RoutingOptions, n: int) -> tuple[int | None, float]:
    """(top_k, min_weight) applied to a mix over n experts: the options', or the automatic ones of the module
    docstring when top_k is None and n > AUTO_DENSE_MAX."""
    if options.top_k is None and n > AUTO_DENSE_MAX:
        return AUTO_TOP_K, max(options.min_weight, AUTO_MIN_WEIGHT)
    return options.top_k, options.min_weight


def apply_options(logits: torch.Tensor, options: RoutingOptions, experts: Sequence[str],
                  no_evidence: torch.Tensor | None = None) -> RoutingResult:
    """The rule of this module's docstring. logits: [B, N]; no_evidence: [B] bool (e.g. empty inputs)."""
    logits = logits.detach().float()
    b, n = logits.shape
    if n != len(experts):
        raise ValueError(f"logits have {n} columns but there are {len(experts)} experts")
    probs = torch.softmax(logits / options.temperature, dim=-1)    # [B, N]
    rules = ["router"] * b

    w = probs
    top_k, min_weight = effective_sparsity(options, n)
    if top_k is not None:
        w_k = keep_top_k(w, top_k)
        rules = ["top_k" if ch else r for r, ch in zip(rules, _changed(w, w_k))]
        w = w_k
    w_m = drop_below(w, min_weight)
    rules = ["min_weight" if ch else r for r, ch in zip(rules, _changed(w, w_m))]
    w = w_m

    unsure = probs.max(dim=-1).values < options.fallback_threshold    # [B]
    if no_evidence is not None:
        unsure = unsure | no_evidence.to(torch.bool)
    if unsure.any():
        w = torch.where(unsure[:, None], fallback_row(n, options.fallback)[None, :], w)
        rules = ["fallback" if u else r for r, u in zip(rules, unsure.tolist())]
    return RoutingResult(experts=list(experts), weights=w.contiguous(), probs=probs, logits=logits, rules=rules)


def _changed(before: torch.Tensor, after: torch.Tensor) -> list[bool]:
    # a row changed if a rule zeroed an entry that had mass
    return ((before > 0) & (after == 0)).any(dim=-1).tolist()
