"""Truncated SVD of a delta matrix into PEFT-style LoRA factors, with a fast path and fallbacks.

For `M: [out, in]` with SVD `U S Vᵀ`, rank r keeps `B = U_r √S_r: [out, r]`, `A = √S_r V_rᵀ: [r, in]`, so
`B A` is the best rank-r approximation (Eckart–Young) and `‖M − B A‖_F = √(Σ_{k>r} s_k²)`.
Kept energy is `Σ_{k≤r} s_k² / ‖M‖_F²`; it is exact on every path, since each path returns an orthogonal
projection of M.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

OVERSAMPLE = 8
POWER_ITERS = 4


@dataclass(frozen=True)
class Factors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    rank: int
    energy: float  # kept share of ‖M‖_F², in [0, 1]
    path: str  # "full", "randomized", "zero" (+ ":fallback-…" when a driver failed)


def rank_for_energy(s: torch.Tensor, total: float, energy: float) -> int:
    """Smallest r with Σ_{k≤r} s_k² ≥ energy · total (s in descending order)."""
    if total <= 0.0:
        return 0
    cum = torch.cumsum(s.double() ** 2, dim=0)
    r = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=torch.float64) * (1 - 1e-12)).item()) + 1
    return min(r, s.numel())


def full_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Thin SVD `(U, S, Vh, how)` in float32 or better; falls back to other drivers rather than failing."""
    m32 = m.float()
    attempts: list[tuple[str, torch.Tensor, dict]] = []
    if m32.is_cuda:
        attempts += [("gesvdj", m32, {"driver": "gesvdj"}), ("gesvd", m32, {"driver": "gesvd"})]
    else:
        attempts += [("gesdd", m32, {})]
    attempts.append(("float64", m32.double(), {"driver": "gesvd"} if m32.is_cuda else {}))
    errors = []
    for how, x, kw in attempts:
        try:
            u, s, vh = torch.linalg.svd(x, full_matrices=False, **kw)
            if torch.isfinite(s).all():
                return u.float(), s.float(), vh.float(), how
            errors.append(f"{how}: non-finite singular values")
        except (RuntimeError, torch.linalg.LinAlgError) as e:  # LinAlgError: did not converge
            errors.append(f"{how}: {e}".splitlines()[0])
    log.warning("SVD drivers failed (%s); using the eigendecomposition of the Gram matrix", "; ".join(errors))
    return _gram_svd(m32.double()) + ("gram-eigh",)


def _gram_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD from eigh of the smaller Gram matrix, in float64 (slower, but eigh always converges)."""
    tall = m.shape[0] >= m.shape[1]
    g = m.T @ m if tall else m @ m.T  # [k, k], k = min(out, in)
    evals, evecs = torch.linalg.eigh(g)
    order = torch.argsort(evals, descending=True)
    s = evals[order].clamp(min=0).sqrt()
    v = evecs[:, order]
    inv = torch.where(s > s.max() * 1e-12, 1.0 / s, torch.zeros_like(s)) if s.numel() else s
    if tall:
        u = (m @ v) * inv  # [out, k]
        return u.float(), s.float(), v.T.float()
    vh = (v.T @ m) * inv[:, None]  # [k, in]
    return v.float(), s.float(), vh.float()


def use_randomized(shape: tuple[int, int], rank: int | None, method: str) -> bool:
    """The `auto` rule: randomized SVD only when the rank is small next to a large matrix."""
    if method != "auto":
        return method == "randomized"
    k = min(shape)
    return rank is not None and k >= 512 and rank * 8 <= k


def truncated_svd(m: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                  method: str = "auto", seed: int = 0) -> Factors:
    """Factor `m: [out, in]` at a fixed `rank` (clamped to min(shape)) or at the smallest rank keeping `energy`."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    m32 = m.float()
    out_f, in_f = m32.shape
    total = float(m32.double().pow(2).sum())
    if total == 0.0:
        return Factors(m32.new_zeros(0, in_f), m32.new_zeros(out_f, 0), 0, 1.0, "zero")
    r_cap = min(out_f, in_f)
    if use_randomized((out_f, in_f), None if rank is None else min(rank, r_cap), method):
        r = min(rank, r_cap)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # svd_lowrank draws from the global generator: seed it, then restore
        try:
            u, s, v = torch.svd_lowrank(m32, q=min(r + OVERSAMPLE, r_cap), niter=POWER_ITERS)
        finally:
            torch.random.set_rng_state(gen_state)
        vh, how = v.T, "randomized"
    else:
        u, s, vh, how = full_svd(m32)
        how = "full" if how in ("gesdd", "gesvdj") else f"full:fallback-{how}"
        r = min(rank, r_cap) if rank is not None else rank_for_energy(s, total, energy)
    r = min(r, s.numel())
    root = s[:r].sqrt()
    b = (u[:, :r] * root).contiguous()  # [out, r]
    a = (root[:, None] * vh[:r]).contiguous()  # [r, in]
    kept = float(s[:r].double().pow(2).sum()) / total
    return Factors(a, b, r, min(kept, 1.0), how)
