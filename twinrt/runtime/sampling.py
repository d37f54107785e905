"""Next-token selection per row: greedy below SAMPLING_EPS, else temperature, min_p, top_k, top_p and a draw.

The rules are vLLM's: a temperature below `SAMPLING_EPS` is greedy (dividing by it would overflow float32), so the
same request picks the same tokens on either backend. For a sampled row with logits `x: [V]` (already through
`logits.process` where the row needs it):

    z = x / T
    min_p:  z[softmax(z) < min_p · max softmax(z)] = -inf
    top_k:  z[z < k-th largest z] = -inf                       (ties with the k-th are kept)
    top_p:  p = top_p_filter(softmax(z), top_p)
    t ~ p, drawn from the row's own generator

Sampling math is float32 per row; valid parameters never produce NaN from logits with a finite maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SAMPLING_EPS = 1e-5


def is_greedy(temperature: float) -> bool:
    """`temperature < SAMPLING_EPS`: argmax, no generator needed."""
    return temperature < SAMPLING_EPS


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of `probs: [V]` outside the smallest set whose mass reaches top_p.

    The most likely token is always kept (a top_p that rounds to 0 in float32 keeps exactly that one):
        keep[i] = i == 0 or Σ_{j < i} sorted_p[j] < top_p
    """
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)  # [V]
    outside = sorted_p.cumsum(0) - sorted_p >= top_p  # mass before this token already reaches top_p
    outside[0] = False
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_p)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """logits: [V] -> the same with -inf where softmax(logits) < min_p · its maximum (the top token stays)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits: [V] -> the same with -inf below the k-th largest value (k <= 0 or k >= V: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
               top_k: int = 0, min_p: float = 0.0) -> int:
    """logits: [V] (finite maximum) -> one token id: argmax when greedy, else a draw as in the module."""
    if is_greedy(temperature):
        return int(logits.argmax())
    scaled = logits.detach().to("cpu", torch.float32) / float(temperature)  # finite where finite: T >= SAMPLING_EPS
    scaled = top_k_filter(min_p_filter(scaled, min_p), top_k)
    probs = torch.softmax(scaled, dim=-1)  # [V], sums to 1, max > 0
    probs = top_p_filter(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def sample_next(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] float32 -> next token ids [B]. Each sampled row draws from its own generator, so its
    tokens do not depend on which other requests share the batch."""
    out = logits.argmax(dim=-1).cpu()  # [B]
    for b, (t, p, g) in enumerate(zip(temperatures, top_ps, generators)):
        if not is_greedy(t):
            out[b] = sample_row(logits[b], t, p, g)
    return out
