"""Shared-core merge methods: pure functions over stacked task vectors.

Every method maps `tau: [N, *shape]` (τ_i = θ_i − θ_base, float32) to one merged task vector `[*shape]`;
the core is then `θ_core = θ_base + merged`. Random methods take their keep-masks as an argument so the
function itself stays pure; `dare_keep_masks` draws them from a seeded generator.
"""

from __future__ import annotations

import torch


def average(tau: torch.Tensor) -> torch.Tensor:
    """merged = mean_i τ_i   (the plain weight average of the experts)."""
    # tau: [N, ...]
    return tau.mean(dim=0)


def task_arithmetic(tau: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """merged = λ · Σ_i τ_i   (Ilharco et al., 2023)."""
    return scaling * tau.sum(dim=0)


def trim_thresholds(tau: torch.Tensor, density: float) -> torch.Tensor | None:
    """Per-expert magnitude thresholds for `magnitude_trim`: the k-th largest |τ_i|, k = int(density · numel).

    -> [N, 1] (+inf where k == 0, so nothing is kept), or None when density >= 1 (nothing is trimmed).
    Found one expert at a time by quickselect, several times faster than a top-k sort on embedding-sized
    tensors, with one tensor-sized temporary whatever N is.
    """
    if density >= 1.0:
        return None
    flat = tau.reshape(tau.shape[0], -1)  # [N, P]
    p = flat.shape[1]
    k = int(density * p)
    out = torch.full((flat.shape[0], 1), float("inf"), dtype=flat.dtype, device=flat.device)
    if k > 0:
        for i in range(flat.shape[0]):
            out[i, 0] = flat[i].abs().kthvalue(p - k + 1).values
    return out


def magnitude_trim(tau: torch.Tensor, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Keep, in every τ_i separately, its top `int(density · numel)` entries by magnitude; zero the rest.

    Selection is by threshold (see `trim_thresholds`); entries tied exactly at the threshold are all kept.
    `threshold` ([N, 1], from the whole tensor) lets a caller trim a slice of columns of a larger τ.
    """
    if density >= 1.0:
        return tau
    flat = tau.reshape(tau.shape[0], -1)  # [N, P]
    if threshold is None:
        threshold = trim_thresholds(flat, density)
    return (flat * (flat.abs() >= threshold)).reshape(tau.shape)


def elect_sign(tau: torch.Tensor) -> torch.Tensor:
    """Sign elected by total mass: sign(Σ_i τ_i), with 0 counted as +1.  -> [...] of ±1."""
    return torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0).to(tau.dtype)


def disjoint_mean(tau: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over the experts whose entry agrees with the elected sign (zeros never agree)."""
    agree = tau.sign() == sign  # [N, ...]
    total = (tau * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def ties(tau: torch.Tensor, *, scaling: float, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """TIES (Yadav et al., 2023): trim to `density`, elect sign by total mass, disjoint mean, times λ.

    `threshold`: the trim thresholds of the whole tensor when `tau` is a slice of its columns.
    """
    trimmed = magnitude_trim(tau, density, threshold)
    return scaling * disjoint_mean(trimmed, elect_sign(trimmed))


def dare_keep_masks(shape: torch.Size, n: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) keep-masks for DARE, one per expert: -> bool [n, *shape].

    Drawn one expert at a time, so the float temporary is one tensor whatever n is.
    """
    probs = torch.full(tuple(shape), density, dtype=torch.float32)
    keep = torch.empty((n, *shape), dtype=torch.bool)
    for i in range(n):
        keep[i] = torch.bernoulli(probs, generator=generator).bool()
    return keep


def dare_drop(tau: torch.Tensor, keep: torch.Tensor, density: float) -> torch.Tensor:
    """DARE (Yu et al., 2024): drop entries where `keep` is False, rescale the survivors by 1/density."""
    return tau * keep / density


def dare_linear(tau: torch.Tensor, *, scaling: float, density: float, keep: torch.Tensor) -> torch.Tensor:
    """DARE then task arithmetic: λ · Σ_i drop(τ_i)."""
    return task_arithmetic(dare_drop(tau, keep, density), scaling=scaling)


def dare_ties(tau: torch.Tensor, *, scaling: float, density: float, keep: torch.Tensor) -> torch.Tensor:
    """DARE then TIES' sign election and disjoint mean (no magnitude trim): λ · disjoint_mean(drop(τ))."""
    dropped = dare_drop(tau, keep, density)
    return scaling * disjoint_mean(dropped, elect_sign(dropped))


def tall_masks(tau: torch.Tensor, merged: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """TALL masks (Wang et al., 2024): expert i owns an entry where |τ_i| ≥ λ·|τ_MTL − τ_i|.  -> bool [N, ...]

    `merged` is the multi-task vector τ_MTL that the masks localise each task in.
    """
    return tau.abs() >= tall_lambda * (merged.unsqueeze(0) - tau).abs()


def consensus(
    tau: torch.Tensor, *, scaling: float, k: int, tall_lambda: float, base: str = "task_arithmetic",
    density: float = 1.0, threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consensus merging (TALL-mask consensus, Wang et al., 2024).

    merged = base_merge(τ) ⊙ [Σ_i tall_i ≥ k]: keep only the weights that at least `k` experts consider
    important (selfish weights, used by one expert only, and catastrophic ones, used by none, are removed).
    The TALL masks are computed against the plain task-arithmetic sum Σ τ_i, as in the paper; `base` is
    the merge whose result is masked ("task_arithmetic" or "ties", the latter trimmed to `density`).
    """
    masks = tall_masks(tau, tau.sum(dim=0), tall_lambda)  # [N, ...]
    agree = masks.sum(dim=0) >= k
    merged = (ties(tau, scaling=scaling, density=density, threshold=threshold) if base == "ties"
              else task_arithmetic(tau, scaling=scaling))
    return merged * agree
