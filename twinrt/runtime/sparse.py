"""Sparse per-row mixing: each row pays for the experts it uses, whatever the number of experts N is.

A mix [B, N] with few non-zero weights per row (top-k routing) is a list of pairs p = (b_p, e_p, w_p), one per
(row, expert) with weight. Every mixing layer then adds, to the core's output,

    y[b] += Σ_{p: b_p = b} w_p · B_{e_p} (A_{e_p} x[b])

from its experts' factors stacked by slot (the layer's own numbering of the experts it has factors for) and
zero-padded to its largest rank, so padding changes nothing:

    a_s: [S, in, r]    a_s[s, :, :r_s] = A_sᵀ        b_s: [S, r, out]    b_s[s, :r_s] = B_sᵀ

Two kernels compute it, neither touching an expert no row uses:

    rowwise:   for each pair, two GEMMs over its row's tokens, the second accumulating into that row of y in
               place (u = x[b] A_sᵀ; y[b] += w u B_sᵀ): no gather, no scatter, no temporary the size of y.
               2 launches per pair and layer, amortised over the row's tokens: for prefill.
    gathered:  no loop at all: two weighted embedding bags over the factors' rows,
                   u[p] = Σ_i x[b_p, i] · a_s[s_p, i, :]                     (one bag of `in` rows per pair)
                   y[b] += Σ_{p: b_p = b} Σ_j w_p u[p, j] · b_s[s_p, j, :]   (one bag of a row's pairs)
               so a token per row (decode) reads each used expert's factors once, in five ops per layer, for
               1 expert or 64.

`reference_sparse_delta` is the plain-torch loop both are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from twinrt.runtime.transfer import to_device


@dataclass(frozen=True)
class Pairs:
    """The (row, expert) pairs of a mix [B, N] that have weight, by row then expert (the mix's row-major order),
    on the mix's device (the host, as MixState keeps it)."""

    batch: int
    rows: torch.Tensor  # [P] long
    experts: torch.Tensor  # [P] long, columns of the mix
    weights: torch.Tensor  # [P] float32

    @classmethod
    def of(cls, mix: torch.Tensor) -> Pairs:
        rows, experts = (mix != 0).nonzero().unbind(1)  # [P], [P]
        return cls(mix.shape[0], rows, experts, mix[rows, experts].float())


@dataclass
class LayerRoutes:
    """The pairs one layout of layers has factors for, in its slots; what both kernels index with.

    `rows`, `slots`, `weights` by row, on the device the kernels run on; row b's pairs are
    `row_starts[b]:row_starts[b + 1]`. `triples()` are the same pairs as Python numbers, found on the host.
    """

    batch: int
    rows: torch.Tensor  # [P] long
    slots: torch.Tensor  # [P] long
    weights: torch.Tensor  # [P] float32
    row_starts: torch.Tensor  # [B + 1] long
    _triples: list  # (row, slot, weight) per pair
    _bags: dict = field(default_factory=dict)  # (in, rank) -> the gathered kernel's bag indices

    @classmethod
    def of(cls, pairs: Pairs, slot_of: torch.Tensor, device: torch.device | None = None) -> LayerRoutes:
        """`pairs` and `slot_of: [N] long` (each expert's slot in the layout, -1 where it has no factors) on the
        host; the routes on `device` (default: the host), sent without blocking."""
        slots = slot_of.to(pairs.experts.device)[pairs.experts]  # [P]
        keep = slots >= 0
        rows, slots, weights = pairs.rows[keep], slots[keep], pairs.weights[keep]
        counts = torch.bincount(rows, minlength=pairs.batch)  # [B]
        row_starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        triples = list(zip(rows.tolist(), slots.tolist(), weights.tolist()))
        dev = device or rows.device
        return cls(pairs.batch, *(to_device(t, dev) for t in (rows, slots, weights, row_starts)), triples)

    def triples(self) -> list[tuple[int, int, float]]:
        """(row, slot, weight) of every pair, as Python numbers (the rowwise kernel's loop)."""
        return self._triples

    def bags(self, in_features: int, rank: int) -> tuple[torch.Tensor, ...]:
        """The gathered kernel's bags: rows of a_s [P·in] and their starts [P] (a bag per pair), rows of b_s
        [P·r] and their starts [B] (a bag per row)."""
        key = (in_features, rank)
        hit = self._bags.get(key)
        if hit is None:
            dev = self.slots.device
            a_idx = self.slots[:, None] * in_features + torch.arange(in_features, device=dev)[None, :]  # [P, in]
            b_idx = self.slots[:, None] * rank + torch.arange(rank, device=dev)[None, :]  # [P, r]
            a_starts = torch.arange(self.slots.numel(), device=dev) * in_features
            hit = self._bags[key] = (a_idx.flatten(), a_starts, b_idx.flatten(), self.row_starts[:-1] * rank)
        return hit


def gathered_delta(x: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor, routes: LayerRoutes) -> torch.Tensor:
    """Σ_p w_p B_{s_p} A_{s_p} x[b_p] per row, as two weighted embedding bags. x: [B, in] or [B, T, in] ->
    the delta in x's shape with `out` last (rows without pairs get zeros)."""
    n_slots, in_f, rank = a_s.shape
    out_f = b_s.shape[-1]
    a_table, b_table = a_s.view(n_slots * in_f, rank), b_s.view(n_slots * rank, out_f)
    a_idx, a_starts, b_idx, b_starts = routes.bags(in_f, rank)
    pairs, batch = routes.rows.numel(), x.shape[0]
    if x.dim() == 2 or x.shape[1] == 1:  # a token per row: the second bags sum each row's pairs
        xp = x.reshape(batch, in_f).index_select(0, routes.rows)  # [P, in]
        u = F.embedding_bag(a_idx, a_table, a_starts, mode="sum", per_sample_weights=xp.reshape(-1))  # [P, r]
        u = u * routes.weights.to(u.dtype)[:, None]
        z = F.embedding_bag(b_idx, b_table, b_starts, mode="sum", per_sample_weights=u.reshape(-1))  # [B, out]
        return z.view(*x.shape[:-1], out_f)
    t = x.shape[1]  # a bag per (pair, token), then each pair's output added to its row
    xp = x.index_select(0, routes.rows)  # [P, T, in]
    a_all = a_idx.view(pairs, 1, in_f).expand(pairs, t, in_f).reshape(-1)
    u = F.embedding_bag(a_all, a_table, torch.arange(pairs * t, device=x.device) * in_f, mode="sum",
                        per_sample_weights=xp.reshape(-1))  # [P·T, r]
    u = u.view(pairs, t, rank) * routes.weights.to(u.dtype)[:, None, None]
    b_all = b_idx.view(pairs, 1, rank).expand(pairs, t, rank).reshape(-1)
    z = F.embedding_bag(b_all, b_table, torch.arange(pairs * t, device=x.device) * rank, mode="sum",
                        per_sample_weights=u.reshape(-1))  # [P·T, out]
    return x.new_zeros(*x.shape[:-1], out_f).index_add_(0, routes.rows, z.view(pairs, t, out_f))


def rowwise_delta_(y: torch.Tensor, x: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor,
                   ranks: tuple[int, ...], routes: LayerRoutes) -> None:
    """y[b] += w_p (x[b] A_{s_p}ᵀ) B_{s_p}ᵀ for every pair, two GEMMs on that row's tokens, in place.
    x: [B, in] or [B, T, in]; y: the same with `out` last, contiguous; `ranks`: each slot's own (unpadded)."""
    batch = x.shape[0]
    xv = x.reshape(batch, -1, x.shape[-1])  # [B, T, in]
    yv = y.view(batch, -1, y.shape[-1])  # [B, T, out]
    for b, s, w in routes.triples():
        r = ranks[s]
        u = torch.mm(xv[b], a_s[s, :, :r])  # [T, r]
        yv[b].addmm_(u, b_s[s, :r], alpha=w)


def reference_sparse_delta(x: torch.Tensor, factors: dict[int, tuple[torch.Tensor, torch.Tensor]],
                           mix: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference: for each row b and each expert n with mix[b, n] != 0, add mix[b, n] B_n A_n x[b]."""
    out = []
    for b in range(x.shape[0]):
        d = torch.zeros(*x.shape[1:-1], next(iter(factors.values()))[1].shape[0], dtype=torch.float32)
        for n, (a_n, b_n) in factors.items():
            if mix[b, n] != 0:
                d = d + float(mix[b, n]) * (x[b].float() @ a_n.float().T @ b_n.float().T)
        out.append(d)
    return torch.stack(out)
