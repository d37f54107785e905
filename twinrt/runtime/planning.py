"""The cost model of a mixed forward: which path a batch takes (core, factored, grouped, materialized) and why.

    costs = ExpertCosts.of(model, mix_linears, n_experts, dtype)     # once per model
    plan = plan_batch(mix, tokens, step_tokens, experts=..., costs=costs, policy=MixPolicy(),
                      is_cached=..., budget_bytes=...)                # every forward
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from twinrt.runtime.mixing import MixLinear


@dataclass(frozen=True)
class MixPolicy:
    """When the grouped path (each active expert's GEMMs on its own rows only) is taken over the concatenated one.

    All three must hold: at most `grouped_density` of the (row, active expert) pairs have weight; each active
    expert gets at least `grouped_min_tokens` tokens of this forward on average (so its GEMMs are not
    launch-bound: a prefill, not the decode step of a few rows); and the active experts' mean rank is at least
    `grouped_min_rank` (below it the skipped FLOPs do not pay for the gathers). benchmarks/bench_fusion.py
    times both paths. Change a model's policy with `tm.policy = dataclasses.replace(tm.policy, ...)`.
    """

    grouped_density: float = 0.5
    grouped_min_tokens: int = 64
    grouped_min_rank: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.grouped_density <= 1.0:
            raise ValueError(f"grouped_density must be in [0, 1], got {self.grouped_density!r}")
        if self.grouped_min_tokens < 0 or self.grouped_min_rank < 0:
            raise ValueError(f"grouped_min_tokens and grouped_min_rank must be >= 0, got "
                             f"{self.grouped_min_tokens!r} and {self.grouped_min_rank!r}")


@dataclass(frozen=True)
class ExpertCosts:
    """What each expert adds to a forward, summed over the mixing layers (tuples are indexed by expert)."""

    base_flops: int  # per token: 2·in·out of every nn.Linear of the model
    factored_flops: tuple[int, ...]  # per token: 2·r·(in + out) of each factored layer
    dense_flops: tuple[int, ...]  # per token: 2·in·out of each dense weight delta
    materialize_flops: tuple[int, ...]  # once: building this expert's share of every W'
    rank: tuple[int, ...]  # the expert's ranks, summed over the mixing layers
    mixing_layers: int
    materialize_bytes: int  # the W' of every mixing layer, for one mix

    @classmethod
    def of(cls, model: nn.Module, layers: Sequence[MixLinear], n_experts: int, dtype: torch.dtype) -> ExpertCosts:
        """Walk the model's modules once (plans run every decode step, so they never walk them)."""
        fac, dense, mat, rank = [0] * n_experts, [0] * n_experts, [0] * n_experts, [0] * n_experts
        for layer in layers:
            i, o = layer.in_features, layer.out_features
            for e, rk in zip(layer.experts, layer.ranks):
                fac[e] += 2 * rk * (i + o)
                mat[e] += 2 * rk * i * o
                rank[e] += rk
            for e in layer.dense:
                dense[e] += 2 * i * o
                mat[e] += 2 * i * o
        base = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
        mat_bytes = sum(layer.base.weight.numel() for layer in layers) * dtype.itemsize
        return cls(base, tuple(fac), tuple(dense), tuple(mat), tuple(rank), len(layers), mat_bytes)

    def flops(self, active: tuple[int, ...], share: Mapping[int, float] | None = None) -> tuple[int, int, int]:
        """(base, extra factored, materialize) FLOPs: per token for the first two, once for the last.

        `share`: the fraction of rows each expert's factors run on (grouped path); default all rows.
        """
        extra = sum(round(self.factored_flops[e] * (1.0 if share is None else share[e])) + self.dense_flops[e]
                    for e in active)
        return self.base_flops, extra, sum(self.materialize_flops[e] for e in active)

    def mean_rank(self, active: tuple[int, ...]) -> float:
        """The active experts' rank per mixing layer, on average."""
        return sum(self.rank[e] for e in active) / max(self.mixing_layers * len(active), 1)


@dataclass(frozen=True)
class Plan:
    """How a batch will be run, and why (see `plan_batch`)."""

    path: str  # "core" | "factored" | "grouped" | "materialized"
    reason: str
    rows: int
    active_experts: tuple[str, ...]
    base_flops_per_token: int
    extra_flops_per_token: int  # the factored path's two skinny GEMMs, summed over layers
    materialize_flops: int  # building W' once (0 when cached)
    materialize_bytes: int
    tokens: int

    @property
    def flop_limit_ratio(self) -> float:
        """1 / (1 + extra/base): the best throughput ratio to the core the factored path can reach."""
        return 1.0 / (1.0 + self.extra_flops_per_token / max(self.base_flops_per_token, 1))

    def __str__(self) -> str:
        return (f"{self.path}: {self.reason} | rows={self.rows} active={list(self.active_experts)} "
                f"base={self.base_flops_per_token / 1e6:.1f} MFLOP/tok extra={self.extra_flops_per_token / 1e6:.2f} "
                f"MFLOP/tok (limit {self.flop_limit_ratio:.3f}x) materialize={self.materialize_flops / 1e9:.2f} GFLOP "
                f"{self.materialize_bytes / 2**20:.0f} MiB tokens={self.tokens}")


def plan_batch(mix: torch.Tensor | None, tokens: int, step_tokens: int | None, *, experts: Sequence[str],
               costs: ExpertCosts, policy: MixPolicy, is_cached: Callable[[torch.Tensor], bool],
               budget_bytes: int) -> Plan:
    """Choose the path for a batch with this mix ([B, N]) that will process about `tokens` tokens in all.

    core: no expert has weight. materialized: every row shares one mix, and building W' costs less than the
    factored GEMMs over `tokens` (or W' is cached: `is_cached(row)`) and fits `budget_bytes`. grouped: rows
    have different mixes and `policy` holds for this forward (`step_tokens` tokens; None = unknown, never
    grouped). factored: otherwise.
    """
    rows = 0 if mix is None else mix.shape[0]
    active = () if mix is None else tuple(int(i) for i in torch.nonzero((mix != 0).any(0)).flatten())
    base, extra, mat = costs.flops(active)
    mat_bytes = costs.materialize_bytes
    names = tuple(experts[i] for i in active)

    def mk(path: str, why: str, mf: int = mat) -> Plan:
        return Plan(path, why, rows, names, base, extra if path != "core" else 0, mf, mat_bytes, tokens)

    if not active:
        return mk("core", "no expert has weight", 0)
    if not bool((mix == mix[0]).all()):
        nz = (mix[:, list(active)] != 0).float()  # [B, A]
        density = float(nz.mean())
        if (rows > 1 and len(active) > 1 and density <= policy.grouped_density and step_tokens is not None
                and step_tokens * density >= policy.grouped_min_tokens
                and costs.mean_rank(active) >= policy.grouped_min_rank):
            share = nz.mean(0).tolist()  # fraction of rows using each active expert
            extra_g = costs.flops(active, share=dict(zip(active, share)))[1]
            return Plan("grouped", f"rows have different mixes; {density:.0%} of (row, expert) pairs have "
                        f"weight: GEMMs per expert on its rows", rows, names, base, extra_g, mat, mat_bytes, tokens)
        return mk("factored", "rows have different mixes")
    if is_cached(mix[0]):
        return mk("materialized", "all rows share a mix whose W' is cached", 0)
    if mat_bytes > budget_bytes:
        return mk("factored", "W' would not fit the materialize budget")
    if tokens * extra <= mat:
        return mk("factored", f"building W' costs more than {tokens} tokens of factored GEMMs")
    return mk("materialized", "all rows share a mix; building W' once is cheaper than the factored GEMMs")
