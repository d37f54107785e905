"""Next-token selection per row: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of `probs: [V]` outside the smallest set whose mass reaches top_p (keeps ≥ 1 token)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    outside = sorted_p.cumsum(0) - sorted_p >= top_p  # mass before this token already reaches top_p
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_p)


def sample_next(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] float32 -> next token ids [B]. Each sampled row draws from its own generator, so its
    tokens do not depend on which other requests share the batch."""
    out = logits.argmax(dim=-1).cpu()
    for b, (t, p, g) in enumerate(zip(temperatures, top_ps, generators)):
        if t > 0:
            probs = torch.softmax(logits[b].cpu() / t, dim=-1)
            probs = top_p_filter(probs, p)
            out[b] = torch.multinomial(probs, 1, generator=g)[0]
    return out
