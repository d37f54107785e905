"""Shared-core merge methods: pure functions over stacked task vectors.

Every method maps `tau: [N, *shape]` (τ_i = θ_i − θ_base, float32) to one merged task vector `[*shape]`;
the core is then `θ_core = θ_base + merged`. Random methods take their keep-masks as an argument so the
function itself stays pure; `dare_keep_masks` draws them from a seeded generator. Statistics of the whole
tensor that a method needs (TIES' trim thresholds, PCB's clip bounds and drop thresholds) are computed by
a separate function and passed in, so the method itself can run on any slice of columns.
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


def sorted_at(flat: torch.Tensor, index: int) -> torch.Tensor:
    """Per row of `flat: [N, P]`, the value at 0-based position `index` of the row sorted ascending.  -> [N, 1]

    One row at a time by quickselect (one row-sized temporary, not a sort of the whole [N, P])."""
    out = torch.empty((flat.shape[0], 1), dtype=flat.dtype, device=flat.device)
    for i in range(flat.shape[0]):
        out[i, 0] = flat[i].kthvalue(index + 1).values
    return out


def clip_indices(p: int, low_share: float, high_share: float) -> tuple[int, int]:
    """The sorted positions PCB clips a row of `p` values to: `int(p·low)` and `int(p·(1 − high) − 1)`.

    This is the PCB-merging reference's rule, float arithmetic and truncation toward zero included, so the
    upper bound of a small row sits one below its maximum whenever `p · high < 1`.
    """
    return int(p * low_share), max(0, int(p * (1 - high_share) - 1))


def min_max(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(x − lo) / (hi − lo) per row (lo, hi: [N, 1]); 0 in a row where hi == lo (nothing to tell apart)."""
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def pcb_scores(tau: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """PCB's balancing score of every entry:  β_i = exp(N · intra_i²) ⊙ tanh(τ_i ⊙ Σ_j τ_j).   -> [N, P]

    intra (intra-balancing, the entry's weight within its own task) is |τ_i| clipped to [lo_i, hi_i] and
    min-max scaled per expert; the tanh term (inter-balancing) is the entry's agreement with all the tasks'
    sum. `lo`, `hi`: [N, 1], the clip bounds of the whole tensor (`pcb_statistics`).
    """
    # tau: [N, P]
    intra = min_max(tau.abs().clamp(lo, hi), lo, hi)
    return torch.exp(tau.shape[0] * intra.square()) * torch.tanh(tau * tau.sum(dim=0))


def pcb_statistics(flat: torch.Tensor, *, density: float, outlier: float,
                   chunk: int = 1 << 20) -> dict[str, torch.Tensor]:
    """The whole-tensor statistics `pcb` needs, each [N, 1]: the clip bounds of |τ_i| (`lo`, `hi`, at the
    `outlier` share from either end), and the drop threshold and maximum of the scores β_i (`floor`: the
    value at sorted position int(P · (1 − density)), `top`)."""
    n, p = flat.shape  # [N, P]
    lo_at, hi_at = clip_indices(p, outlier, outlier)
    mag = flat.abs()
    lo, hi = sorted_at(mag, lo_at), sorted_at(mag, hi_at)
    del mag
    scores = torch.empty_like(flat)
    for s in range(0, p, chunk):
        scores[:, s:s + chunk] = pcb_scores(flat[:, s:s + chunk], lo, hi)
    floor_at, _ = clip_indices(p, 1 - density, 0.0)
    return {"lo": lo, "hi": hi, "floor": sorted_at(scores, floor_at), "top": scores.amax(dim=1, keepdim=True)}


def pcb(tau: torch.Tensor, *, scaling: float, density: float, outlier: float, lo: torch.Tensor, hi: torch.Tensor,
        floor: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """PCB-merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging").

        c_i    = sign(τ_i) · clip(|τ_i|, lo_i, hi_i)                  outliers clipped
        β_i    = exp(N · intra_i²) ⊙ tanh(τ_i ⊙ Σ_j τ_j)              intra- and inter-balancing (pcb_scores)
        s_i    = (clip(β_i, floor_i, top_i) − floor_i) / (top_i − floor_i)   drop: every β_i at or below the
                                                                      (1 − density) quantile gets weight 0
        merged = λ · Σ_i s_i ⊙ c_i / max(Σ_i s_i, 1e-12)              rescale by the kept weights

    per tensor (the paper flattens the whole model into one vector; twinrt merges tensor by tensor, as it
    does TIES), with `density` the paper's ratio r of entries kept per expert and `outlier` its clip share
    (0.0001 in the reference code). The statistics come from the whole tensor (`pcb_statistics`).
    """
    # tau: [N, P] (a slice of columns of the whole tensor)
    clipped = tau.sign() * tau.abs().clamp(lo, hi)
    weight = min_max(pcb_scores(tau, lo, hi).clamp(floor, top), floor, top)  # [N, P] in [0, 1]
    return scaling * (weight * clipped).sum(dim=0) / weight.sum(dim=0).clamp(min=1e-12)
