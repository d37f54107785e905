"""Per-row expert mixing inside a model's modules (Contract 3 semantics).

For a batch whose row b has mix weights `mix[b, :]` over N experts, every wrapped module computes

    linear:     y[b] = W x[b] + Σ_n mix[b, n] · B_n (A_n x[b])  (+ Σ_n mix[b, n] · D_n x[b] for dense deltas)
    embedding:  e[b] = W[ids[b]] + Σ_n mix[b, n] · D_n[ids[b]]
    norm:       y[b] = norm_{w + Σ_n mix[b, n] δ_n}(x[b])        (norms affine in their weight, e.g. RMSNorm)

A linear layer keeps its experts' factors stacked by slot, zero-padded to its largest rank (`a_s: [S, in, r]`,
`b_s: [S, r, out]`, see sparse.py), and runs one of these kernels (the planner picks, see planning.py):

    factored:  the active experts' factors concatenated, `A_cat: [R, in]`, `B_cat: [out, R]`, two skinny GEMMs
               with a per-row rank scale `s[b, k] = mix[b, expert(k)]`: y = x Wᵀ + ((x A_catᵀ) ⊙ s) B_catᵀ.
               Every row pays for every expert active in the batch (experts no row uses are left out): the
               path for dense mixes.
    rowwise, gathered:  a row pays only for its own experts (top-k routing over many experts; sparse.py; on
               CUDA the gathered kernel is two Triton launches, triton_lora.py).
    materialized:  a cached `W' = W + B_cat diag(s) A_cat` when every row shares one mix.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from twinrt.runtime import triton_lora
from twinrt.runtime.sparse import LayerRoutes, Pairs, gathered_delta, rowwise_delta_
from twinrt.runtime.transfer import to_device

KERNELS = ("factored", "rowwise", "gathered")  # how a mixing layer adds rows' experts (see the module docstring)


@dataclass
class MixState:
    """The mix of the batch being run, shared by every wrapped module of one model.

    `mix: [B, N]` on `device` (None: the mix's own) or None (core only). `materialized` names a mix shared by all
    rows when that path is on; `kernel` (one of KERNELS) is how the factored layers add the experts.

    What the layers index with (the active experts, each column's rows, the sparse kernels' pairs) is found on
    a host copy of the mix and sent over without blocking, so no layer waits for the device in a forward pass.
    """

    n_experts: int
    device: torch.device | None = None
    mix: torch.Tensor | None = None
    active: tuple[int, ...] = ()  # experts with a non-zero weight in some row
    materialized: tuple | None = None  # key of the cached W' to use, when all rows share one mix
    kernel: str = "factored"
    pairs: Pairs | None = None  # the rowwise and gathered kernels: the mix's (row, expert) pairs with weight
    _host: torch.Tensor | None = None  # the mix on the host
    _cols: dict = field(default_factory=dict)
    _routes: dict = field(default_factory=dict)
    _rows: dict = field(default_factory=dict)

    def set(self, mix: torch.Tensor | None, materialized: tuple | None = None, kernel: str = "factored") -> None:
        """Use `mix` ([B, N], best given on the host: one on the device is read back once here)."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.materialized = materialized
        self.kernel = kernel
        self._cols = {}
        self._routes = {}
        self._rows = {}
        self.pairs = None
        if mix is None:
            self.mix = self._host = None
            self.active = ()
            return
        dev = self.device or mix.device
        self._host = mix.detach().to("cpu")
        self.mix = mix if mix.device == dev else to_device(self._host, dev)
        nz = self._host != 0  # [B, N]
        self.active = tuple(int(i) for i in torch.nonzero(nz.any(dim=0)).flatten())
        if kernel != "factored":
            self.pairs = Pairs.of(self._host)

    def columns(self, experts: tuple[int, ...], ranks: tuple[int, ...]) -> torch.Tensor:
        """Per-row rank scale `s: [B, Σ ranks]` for the given experts' slots (cached per layout)."""
        key = (experts, ranks)
        s = self._cols.get(key)
        if s is None:
            assert self._host is not None and self.mix is not None
            idx = torch.tensor([e for e, r in zip(experts, ranks) for _ in range(r)], dtype=torch.long)
            s = self._cols[key] = to_device(self._host.index_select(1, idx), self.mix.device)  # [B, R]
        return s

    def rows(self, e: int) -> torch.Tensor | None:
        """The rows that give column `e` weight ([R] indices on the mix's device), or None when every row does
        (cached per column and batch)."""
        if e not in self._rows:
            assert self._host is not None and self.mix is not None
            idx = torch.nonzero(self._host[:, e]).flatten()
            self._rows[e] = None if len(idx) == self._host.shape[0] else to_device(idx, self.mix.device)
        return self._rows[e]

    def routes(self, experts: tuple[int, ...], slot_of: torch.Tensor) -> LayerRoutes:
        """The pairs of the layers whose experts (by slot) are `experts`, `slot_of: [N]` on the host (cached per
        layout), on the mix's device."""
        hit = self._routes.get(experts)
        if hit is None:
            assert self.pairs is not None and self.mix is not None
            hit = self._routes[experts] = LayerRoutes.of(self.pairs, slot_of, self.mix.device)
        return hit


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
        self.experts = tuple(sorted(factors))  # experts with factors here, ascending: slot s is experts[s]
        self.ranks = tuple(factors[e][0].shape[0] for e in self.experts)
        w = base.weight
        n_slots, rank = len(self.experts), max(self.ranks, default=0)
        a_s = w.new_zeros(n_slots, w.shape[1], rank)  # [S, in, r]: a_s[s, :, :r_s] = A_sᵀ
        b_s = w.new_zeros(n_slots, rank, w.shape[0])  # [S, r, out]: b_s[s, :r_s] = B_sᵀ
        for s, e in enumerate(self.experts):
            a, b = factors[e]  # [r_s, in], [out, r_s]
            a_s[s, :, : a.shape[0]] = a.T.to(w)
            b_s[s, : a.shape[0]] = b.T.to(w)
        self.register_buffer("a_s", a_s, persistent=False)
        self.register_buffer("b_s", b_s, persistent=False)
        self.slot_of = torch.full((state.n_experts,), -1, dtype=torch.long)  # [N] on the host: slot, -1 none
        self.slot_of[list(self.experts)] = torch.arange(n_slots)
        self.dense = {e: d.to(w) for e, d in (dense or {}).items()}  # expert -> [out, in]
        self.dense_bias = {e: d.to(w) for e, d in (dense_bias or {}).items()}  # expert -> [out]
        self._subsets: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, tuple, tuple]] = OrderedDict()
        self._subset_cache = subset_cache
        self.materialized: dict[tuple, torch.Tensor] = {}  # mix key -> W' (owned by the model's LRU)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _concat(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_catᵀ [in, R], B_catᵀ [R, out]) of these slots, unpadded (B_catᵀ of every slot at one rank: a view)."""
        if not slots:
            return self.a_s.new_zeros(self.in_features, 0), self.b_s.new_zeros(0, self.out_features)
        a_t = torch.cat([self.a_s[s, :, : self.ranks[s]] for s in slots], dim=1)
        if len(slots) == len(self.experts) and len(set(self.ranks)) == 1:
            return a_t, self.b_s.view(-1, self.out_features)
        return a_t, torch.cat([self.b_s[s, : self.ranks[s]] for s in slots])

    @property
    def a_cat(self) -> torch.Tensor:
        """Every expert's A concatenated, [R, in] (built from the stack, not kept)."""
        return self._concat(list(range(len(self.experts))))[0].T

    @property
    def b_t(self) -> torch.Tensor:
        """Every expert's Bᵀ concatenated, [R, out]."""
        return self._concat(list(range(len(self.experts))))[1]

    def _active_factors(self, active: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """(A_catᵀ [in, R], B_catᵀ [R, out], experts, ranks) of the active experts: the factored kernel's
        operands, concatenated from the stacks and kept for the last `subset_cache` sets of active experts (a
        copy of their A factors, of their B factors too unless they are every expert at one rank)."""
        experts = tuple(e for e in self.experts if e in active)
        hit = self._subsets.get(experts)
        if hit is None:
            slots = [s for s, e in enumerate(self.experts) if e in experts]
            hit = self._subsets[experts] = (*self._concat(slots), experts, tuple(self.ranks[s] for s in slots))
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
            s = mix_row.float().to(w.device).index_select(0, idx)  # [R]
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
        if self.experts:
            if st.kernel == "factored":
                self._concatenated(x, y, st)
            else:
                routes = st.routes(self.experts, self.slot_of)
                if st.kernel == "gathered" and x.is_cuda and triton_lora.ENABLED and triton_lora.available(x):
                    triton_lora.gathered_add_(y, x, self.a_s, self.b_s, routes)
                elif st.kernel == "gathered":
                    y.add_(gathered_delta(x, self.a_s, self.b_s, routes))
                else:
                    rowwise_delta_(y, x, self.a_s, self.b_s, self.ranks, routes)
        for e, d in self.dense.items():
            if e in st.active:
                y = self._dense_delta(x, y, st.mix[:, e], d, st.rows(e))
        for e, d in self.dense_bias.items():
            if e in st.active:
                y = y + _per_row(st.mix[:, e], y) * d
        return y

    @staticmethod
    def _dense_delta(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, d: torch.Tensor,
                     rows: torch.Tensor | None) -> torch.Tensor:
        """y + w[b] · D x[b] on the rows b with w[b] != 0 only (`rows`; None: all), a static merge's rows, say:
        a dense delta costs a full GEMM, which the other rows of the batch do not pay."""
        if rows is None:
            return y + _per_row(w, y) * F.linear(x, d)
        return y.index_add(0, rows, _per_row(w[rows], y) * F.linear(x.index_select(0, rows), d))

    def _concatenated(self, x: torch.Tensor, y: torch.Tensor, st: MixState) -> None:
        a_t, b_t, experts, ranks = self._active_factors(st.active)
        if ranks:
            u = torch.matmul(x, a_t)  # [B, T, R]
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
