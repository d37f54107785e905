"""Data-based shared-core merge methods: pure functions of the stacked task vectors and their statistics.

Each maps `tau: [N, *shape]` (τ_i = θ_i − θ_base, float32) and `stats` (`TensorStats`: the experts' Fisher
diagonals and Gram matrices of this tensor, from their calibration data) to a merged task vector. The
objectives are written over θ but are linear in it, so θ_base cancels and they hold for τ as written.
Linear systems are solved in float64 (the result is float32 again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from twinrt.merge.stats import TensorStats


def fisher(tau: torch.Tensor, *, floor: float, stats: TensorStats) -> torch.Tensor:
    """Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging").

        merged = Σ_i (F_i + floor) ⊙ τ_i / Σ_i (F_i + floor)      per entry

    F_i the diagonal (empirical) Fisher of expert i, `floor` the paper's fisher floor: an entry no expert's
    data moves gets the plain average. A tensor without Fishers (not a model parameter) is averaged.
    """
    # tau: [N, P] (a slice of columns), stats.fisher: [N, P]
    if stats.fisher is None:
        return tau.mean(dim=0)
    weight = stats.fisher.to(tau.dtype) + floor
    return (weight * tau).sum(dim=0) / weight.sum(dim=0)


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's regularised Gram: the off-diagonal entries times `alpha`, the diagonal kept.

    G̃ = α G + (1 − α) diag(G); α = 1 is the plain Gram, α = 0 its diagonal (then RegMean is a per-input-
    feature weighted average)."""
    # gram: [..., d, d]
    if alpha == 1.0:
        return gram
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(diag)


def solve_right(rhs: torch.Tensor, lhs: torch.Tensor) -> torch.Tensor:
    """X with X · lhs = rhs for a symmetric positive semi-definite `lhs: [d, d]`, `rhs: [m, d]`.  -> [m, d]

    Cholesky when lhs is positive definite; otherwise the pseudo-inverse (the minimum-norm least-squares X,
    so a direction no input ever takes gets 0)."""
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    return rhs @ torch.linalg.pinv(lhs, hermitian=True)


def regmean(tau: torch.Tensor, *, alpha: float, stats: TensorStats) -> torch.Tensor:
    """RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

    For a linear weight W: [out, in] with input Grams G_i = X_iᵀ X_i / T_i (per token):

        W* = argmin_W Σ_i ‖X_i W_iᵀ − X_i Wᵀ‖² / T_i  =  (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹

    with G̃_i the Gram with its off-diagonal entries scaled by `alpha` (`scale_off_diagonal`; α = 1 is the
    exact least-squares solution). Tensors without Grams (embeddings, norms, biases) are averaged, as in
    the paper.
    """
    # tau: [N, out, in], stats.gram_in: [N, in, in]
    if stats.gram_in is None:
        return tau.mean(dim=0)
    gram = scale_off_diagonal(stats.gram_in.double(), alpha)
    rhs = torch.einsum("noi,nij->oj", tau.double(), gram)  # Σ_i τ_i G̃_i: [out, in]
    return solve_right(rhs, gram.sum(dim=0)).to(tau.dtype)


Operator = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradient(apply: Operator, rhs: torch.Tensor, x0: torch.Tensor, *, iterations: int,
                       tolerance: float) -> tuple[torch.Tensor, int, float]:
    """Solve `apply(X) = rhs` for a symmetric positive semi-definite linear operator by conjugate gradient.

    Starts from `x0`; stops after `iterations` steps or once ‖rhs − apply(X)‖ ≤ tolerance · ‖rhs‖ (Frobenius
    norms, the inner product ⟨A, B⟩ = Σ A ⊙ B). -> (X, steps taken, final relative residual, recomputed).
    """
    x = x0.clone()
    r = rhs - apply(x)
    p = r.clone()
    rs = float((r * r).sum())
    scale = float(rhs.norm()) or 1.0
    steps = 0
    while steps < iterations and rs ** 0.5 > tolerance * scale:
        ap = apply(p)
        curvature = float((p * ap).sum())
        if curvature <= 0.0:  # p is in the operator's null space: nothing left to gain along it
            break
        step = rs / curvature
        x.add_(p, alpha=step)
        r.sub_(ap, alpha=step)
        rs_next = float((r * r).sum())
        p.mul_(rs_next / rs).add_(r)
        rs = rs_next
        steps += 1
    residual = float((rhs - apply(x)).norm()) / scale
    return x, steps, residual


def mats(tau: torch.Tensor, *, scaling: float, objective: str, alpha: float, iterations: int, tolerance: float,
         stats: TensorStats) -> tuple[torch.Tensor, dict[str, Any]]:
    """MaTS (Tam, Bansal & Raffel, TMLR 2024, "Merging by Matching Models in Task Parameter Subspaces").

    Merging as a linear system per linear weight W: [out, in], solved by conjugate gradient from the task-
    arithmetic point λ · Σ_i τ_i:

        objective "regmean":  W Σ_i G̃_i = Σ_i W_i G̃_i                     (RegMean's system; closed form exists)
        objective "kfac":     Σ_i B_i W G̃_i = Σ_i B_i W_i G̃_i             (block-diagonal K-FAC Fisher, no
                                                                          closed form for N > 1)

    G̃_i the input Gram with off-diagonal entries times `alpha` (1: the exact K-FAC block), B_i the output-
    gradient Gram. A tensor without the statistics its objective needs keeps the initialization (task
    arithmetic). -> (merged, {"iterations", "residual"}: the CG steps and final relative residual, or {}
    where there was no system to solve).
    """
    # tau: [N, out, in]; stats.gram_in: [N, in, in]; stats.gram_out: [N, out, out]
    init = scaling * tau.sum(dim=0)
    if stats.gram_in is None or (objective == "kfac" and stats.gram_out is None):
        return init, {}
    t = tau.double()
    g_in = scale_off_diagonal(stats.gram_in.double(), alpha)
    if objective == "regmean":
        total = g_in.sum(dim=0)  # [in, in]
        rhs = torch.einsum("noi,nij->oj", t, g_in)

        def apply(x: torch.Tensor) -> torch.Tensor:
            return x @ total
    else:
        g_out = stats.gram_out.double()
        rhs = torch.einsum("npo,noi,nij->pj", g_out, t, g_in)  # Σ_i B_i τ_i G̃_i: [out, in]

        def apply(x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("npo,oi,nij->pj", g_out, x, g_in)
    x, steps, residual = conjugate_gradient(apply, rhs, init.double(), iterations=iterations, tolerance=tolerance)
    return x.to(tau.dtype), {"iterations": steps, "residual": residual}
