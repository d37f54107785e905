"""Per-row expert mixing inside a model's modules (Contract 3 semantics).

For a batch whose row b has mix weights `mix[b, :]` over N experts, every wrapped module computes

    linear:     y[b] = W x[b] + Σ_n mix[b, n] · B_n (A_n x[b])  (+ Σ_n mix[b, n] · D_n x[b] for dense deltas)
    embedding:  e[b] = W[ids[b]] + Σ_n mix[b, n] · D_n[ids[b]]
    norm:       y[b] = norm_{w + Σ_n mix[b, n] δ_n}(x[b])        (norms affine in their weight, e.g. RMSNorm)

The factored path concatenates the active experts' factors, `A_cat: [R, in]`, `B_cat: [out, R]`, and does two
skinny GEMMs with a per-row rank scale `s[b, k] = mix[b, expert(k)]`:  y = x Wᵀ + ((x A_catᵀ) ⊙ s) B_catᵀ.
Experts with zero weight in every row of the batch are left out of the GEMMs. When most (row, expert) pairs of
a batch are zero (top-k routing: each row uses a few of many experts), the grouped path instead runs each
active expert's two GEMMs on just the rows that use it (gather, GEMMs, index_add), so a row pays only for its
own experts. A materialized path uses a cached `W' = W + B_cat diag(s) A_cat` when every row shares one mix.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


@dataclass
class MixState:
    """The mix of the batch being run, shared by every wrapped module of one model.

    `mix: [B, N]` or None (core only). `key` names a mix shared by all rows when the materialized path is on.
    """

    n_experts: int
    mix: torch.Tensor | None = None
    active: tuple[int, ...] = ()  # experts with a non-zero weight in some row
    materialized: tuple | None = None  # key of the cached W' to use, when all rows share one mix
    groups: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # grouped path: expert -> (rows, weights)
    _cols: dict = field(default_factory=dict)

    def set(self, mix: torch.Tensor | None, materialized: tuple | None = None, grouped: bool = False) -> None:
        self.mix = mix
        self.materialized = materialized
        self._cols = {}
        self.groups = None
        if mix is None:
            self.active = ()
            return
        nz = mix != 0  # [B, N]
        self.active = tuple(int(i) for i in torch.nonzero(nz.any(dim=0)).flatten())
        if grouped:
            self.groups = {}
            for e in self.active:
                rows = torch.nonzero(nz[:, e]).flatten()  # [b_e]
                self.groups[e] = (rows, mix[rows, e])

    def columns(self, experts: tuple[int, ...], ranks: tuple[int, ...]) -> torch.Tensor:
        """Per-row rank scale `s: [B, Σ ranks]` for the given experts' slots (cached per layout)."""
        key = (experts, ranks)
        s = self._cols.get(key)
        if s is None:
            assert self.mix is not None
            idx = torch.tensor([e for e, r in zip(experts, ranks) for _ in range(r)], device=self.mix.device)
            s = self._cols[key] = self.mix.index_select(1, idx)  # [B, R]
        return s


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """v: [B] -> [B, 1, ..., 1] broadcastable against `like: [B, ...]`, in its dtype."""
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class MixLinear(nn.Module):
    """nn.Linear plus per-expert low-rank factors and/or dense weight deltas, mixed per row."""

    def __init__(self, base: nn.Linear, state: MixState, factors: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 dense: dict[int, torch.Tensor] | None = None, dense_bias: dict[int, torch.Tensor] | None = None,
                 subset_cache: int = 4) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.experts = tuple(sorted(factors))  # experts with factors here, ascending
        self.ranks = tuple(factors[e][0].shape[0] for e in self.experts)
        a = [factors[e][0] for e in self.experts]  # [r_n, in]
        b = [factors[e][1] for e in self.experts]  # [out, r_n]
        w = base.weight
        self.register_buffer("a_cat", torch.cat(a).to(w) if a else w.new_zeros(0, w.shape[1]), persistent=False)
        b_cat = torch.cat(b, dim=1).to(w) if b else w.new_zeros(w.shape[0], 0)  # [out, R]
        self.register_buffer("b_t", b_cat.T.contiguous(), persistent=False)  # [R, out]: addmm_'s layout
        self.dense = {e: d.to(w) for e, d in (dense or {}).items()}  # expert -> [out, in]
        self.dense_bias = {e: d.to(w) for e, d in (dense_bias or {}).items()}  # expert -> [out]
        self._subsets: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, tuple, tuple]] = OrderedDict()
        self._subset_cache = subset_cache
        self.materialized: dict[tuple, torch.Tensor] = {}  # mix key -> W' (owned by the model's LRU)
        starts = torch.cumsum(torch.tensor((0,) + self.ranks), 0).tolist()
        self.slots = {e: (st, r) for e, st, r in zip(self.experts, starts, self.ranks)}  # expert -> rows of a_cat

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _active_factors(self, active: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """(A_cat [R, in], B_catᵀ [R, out]) restricted to the active experts (all of them: no copy)."""
        experts = tuple(e for e in self.experts if e in active)
        if experts == self.experts:
            return self.a_cat, self.b_t, self.experts, self.ranks
        hit = self._subsets.get(experts)
        if hit is None:
            offsets = dict(zip(self.experts, torch.cumsum(torch.tensor((0,) + self.ranks), 0).tolist()))
            rows = [torch.arange(offsets[e], offsets[e] + r) for e, r in zip(self.experts, self.ranks) if e in active]
            idx = torch.cat(rows).to(self.a_cat.device) if rows else torch.zeros(0, dtype=torch.long)
            ranks = tuple(r for e, r in zip(self.experts, self.ranks) if e in active)
            hit = (self.a_cat.index_select(0, idx), self.b_t.index_select(0, idx), experts, ranks)
            self._subsets[experts] = hit
            if len(self._subsets) > self._subset_cache:
                self._subsets.popitem(last=False)
        else:
            self._subsets.move_to_end(experts)
        return hit

    def delta_weight(self, mix_row: torch.Tensor) -> torch.Tensor:
        """Σ_n mix[n] (B_n A_n + D_n): [out, in], in float32 — the materialized delta for one shared mix."""
        w = torch.zeros(self.base.weight.shape, dtype=torch.float32, device=self.base.weight.device)
        if self.experts:
            idx = torch.tensor([e for e, r in zip(self.experts, self.ranks) for _ in range(r)], device=w.device)
            s = mix_row.float().index_select(0, idx)  # [R]
            w += (self.b_t.float().T * s) @ self.a_cat.float()
        for e, d in self.dense.items():
            w += float(mix_row[e]) * d.float()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.materialized is not None and st.materialized in self.materialized:
            bias = self.base.bias
            if self.dense_bias:  # one shared mix: row 0's weights are every row's
                extra = sum(st.mix[0, e] * d for e, d in self.dense_bias.items())
                bias = extra if bias is None else bias + extra
            return F.linear(x, self.materialized[st.materialized], bias)
        y = self.base(x)  # [B, T, out] (or [B, out])
        if not st.active:
            return y
        if st.groups is not None:
            self._grouped(x, y, st)
        else:
            self._concatenated(x, y, st)
        for e, d in self.dense.items():
            if e in st.active:
                y = y + _per_row(st.mix[:, e], y) * F.linear(x, d)
        for e, d in self.dense_bias.items():
            if e in st.active:
                y = y + _per_row(st.mix[:, e], y) * d
        return y

    def _grouped(self, x: torch.Tensor, y: torch.Tensor, st: MixState) -> None:
        """y[rows_e] += ((x[rows_e] A_eᵀ) ⊙ w_e) B_eᵀ for each active expert e, on its rows only."""
        batch = x.shape[0]
        for e, (rows, w) in st.groups.items():  # type: ignore[union-attr]
            slot = self.slots.get(e)
            if slot is None:
                continue
            start, r = slot
            a, b_t = self.a_cat[start:start + r], self.b_t[start:start + r]  # [r, in], [r, out]: views
            if rows.numel() == batch:
                u = F.linear(x, a)
                u.mul_(_per_row(w, u))
                y.view(-1, y.shape[-1]).addmm_(u.view(-1, r), b_t)
            else:
                u = F.linear(x.index_select(0, rows), a)  # [b_e, T, r]
                u.mul_(_per_row(w, u))
                y.index_add_(0, rows, torch.matmul(u, b_t))

    def _concatenated(self, x: torch.Tensor, y: torch.Tensor, st: MixState) -> None:
        a, b_t, experts, ranks = self._active_factors(st.active)
        if ranks:
            u = F.linear(x, a)  # [B, T, R]
            s = st.columns(experts, ranks).to(u.dtype)  # [B, R]
            u.mul_(s[:, None, :] if u.dim() == 3 else s)
            y.view(-1, y.shape[-1]).addmm_(u.view(-1, u.shape[-1]), b_t)  # y += (u ⊙ s) B_catᵀ, in place


class MixEmbedding(nn.Module):
    """nn.Embedding plus per-expert dense deltas of the table, mixed per row."""

    def __init__(self, base: nn.Embedding, state: MixState, dense: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.dense = {e: d.to(base.weight) for e, d in dense.items()}  # expert -> [vocab, dim]

    @property
    def weight(self) -> torch.Tensor:  # transformers reads input embeddings' weight (e.g. for tying)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.base(ids)  # [B, T, dim]
        st = self.state
        for n, d in self.dense.items():
            if n in st.active:
                e = e + _per_row(st.mix[:, n], e) * F.embedding(ids, d)
        return e


def scales_affinely(mod: nn.Module) -> bool:
    """Whether `mod`'s output is affine in its 1-D `weight` (what MixScaleNorm needs: RMSNorm, LayerNorm, and
    (1 + w) variants alike), checked on its behaviour: out(w) == out(0) + w ⊙ (out(1) − out(0)) for a random
    input and weight. A module is recognised by what it computes, not by its name."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, w.shape[0], generator=gen).to(w)
    probe = torch.randn(w.shape[0], generator=gen).to(w)
    try:
        with torch.no_grad():
            out = [functional_call(mod, {"weight": v}, (x,)) for v in (torch.zeros_like(w), torch.ones_like(w), probe)]
    except Exception:  # noqa: BLE001 - a module that cannot run on a [.., dim] input is not a norm over dim
        return False
    zero, one, got = out
    if not all(isinstance(o, torch.Tensor) and o.shape == x.shape for o in out):
        return False
    return bool(torch.allclose(got, zero + probe * (one - zero), rtol=1e-3, atol=1e-4))


class MixScaleNorm(nn.Module):
    """A norm whose output is affine in its weight (RMSNorm, LayerNorm without bias deltas), mixed per row.

    out(w + δ) = out(w) + δ ⊙ (out(1) − out(0)), so each row adds its mixed δ times that slope.
    """

    def __init__(self, base: nn.Module, state: MixState, dense: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.dense = {e: d.to(base.weight) for e, d in dense.items()}  # expert -> [dim]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        st = self.state
        active = [n for n in self.dense if n in st.active]
        if not active:
            return y
        w = self.base.weight
        slope = functional_call(self.base, {"weight": torch.ones_like(w)}, (x,)) - functional_call(
            self.base, {"weight": torch.zeros_like(w)}, (x,))  # [B, T, dim]
        delta = sum(st.mix[:, n, None].to(w.dtype) * self.dense[n] for n in active)  # [B, dim]
        return y + slope * delta[:, None, :]


def reference_forward_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             factors: dict[int, tuple[torch.Tensor, torch.Tensor]], mix: torch.Tensor | None
                             ) -> torch.Tensor:
    """Plain-torch reference: loop over rows and experts, y[b] = W x[b] + Σ_n mix[b, n] B_n A_n x[b]."""
    rows = []
    for b in range(x.shape[0]):
        w = weight.clone()
        if mix is not None:
            for n, (a_n, b_n) in factors.items():
                w = w + mix[b, n] * (b_n @ a_n)
        rows.append(F.linear(x[b], w, bias))
    return torch.stack(rows)
