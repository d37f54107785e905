"""The cost model of a mixed forward: which path a batch takes (core, materialized, or a mixing kernel) and why.

    costs = ExpertCosts.of(model, mix_linears, n_experts, dtype)     # once per model
    plan = plan_batch(mix, tokens, step_tokens, experts=..., costs=costs, policy=MixPolicy(),
                      is_cached=..., budget_bytes=...)                # every forward

Rows with different mixes run one of the mixing kernels (mixing.KERNELS): `factored` pays, on every row, for
every expert some row uses; `rowwise` and `gathered` pay for each row's own experts only (sparse.py). The
planner estimates each kernel's seconds for this forward with `KernelCosts` (a linear model in launches, the
active experts' factor elements, and the (row, expert) pairs' factor elements per token, fit per dtype by
`benchmarks/bench_experts.py --calibrate`) and takes the cheapest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from twinrt.runtime.mixing import KERNELS, MixLinear


@dataclass(frozen=True)
class KernelCosts:
    """Seconds of the mixing kernels' work in one dtype, per launch and per factor element.

    For a forward of T tokens over B rows (t = T / B per row) on L mixing layers, with ΣA the factor elements
    (r·(in + out), summed over layers) of the experts some row uses, ΣP the same summed over every (row,
    expert) pair with weight, and ΣL_P the layers those pairs have factors in:

        factored = 3 L · launch  + f_expert · ΣA + f_token · T · ΣA
        rowwise  = 2 ΣL_P · launch + r_expert · ΣA + r_pair · ΣP + r_token · t · ΣP
        gathered = 5 L · launch  + g_expert · ΣA + g_pair · ΣP + g_token · t · ΣP
    """

    launch: float
    f_expert: float
    f_token: float
    r_expert: float
    r_pair: float
    r_token: float
    g_expert: float
    g_pair: float
    g_token: float

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad:
            raise ValueError(f"kernel costs must be numbers >= 0, got {bad}")

    def seconds(self, kernel: str, *, layers: int, pair_layers: int, tokens: int, rows: int, active: float,
                pairs: float) -> float:
        """The estimate of the class docstring; `active` = ΣA, `pairs` = ΣP, `pair_layers` = ΣL_P."""
        t = tokens / max(rows, 1)
        if kernel == "factored":
            return 3 * layers * self.launch + (self.f_expert + self.f_token * tokens) * active
        if kernel == "rowwise":
            return (2 * pair_layers * self.launch + self.r_expert * active
                    + (self.r_pair + self.r_token * t) * pairs)
        if kernel == "gathered":
            return 5 * layers * self.launch + self.g_expert * active + (self.g_pair + self.g_token * t) * pairs
        raise ValueError(f"unknown kernel {kernel!r}; kernels are {KERNELS}")


# Fit by `python benchmarks/bench_experts.py --calibrate` on the benchmark machine (2 AMD EPYC cores, one thread,
# SmolLM2-135M's layer shapes, rank 16; benchmarks/results/experts_calibration.json). A dtype not listed uses
# float32's; on another machine (a GPU) fit your own and set `tm.policy`.
DEFAULT_COSTS = MappingProxyType({
    "float32": KernelCosts(launch=3.8e-6, f_expert=1.4e-9, f_token=4.8e-11, r_expert=1.2e-9, r_pair=6e-10,
                           r_token=7.5e-11, g_expert=8.7e-10, g_pair=0.0, g_token=2.6e-10),
    "bfloat16": KernelCosts(launch=3e-6, f_expert=4.2e-10, f_token=1.3e-9, r_expert=1.5e-9, r_pair=9e-11,
                            r_token=1.2e-9, g_expert=4.2e-10, g_pair=0.0, g_token=2.7e-10),
})


@dataclass(frozen=True)
class MixPolicy:
    """What the planner may choose and what it believes the kernels cost.

    `kernels`: the mixing kernels it may pick for rows with different mixes (mixing.KERNELS; "factored" must be
    among them, it is the fallback); `costs`: KernelCosts per dtype name ("float32", ...). Change a model's
    policy with `tm.policy = dataclasses.replace(tm.policy, ...)`.
    """

    kernels: tuple[str, ...] = KERNELS
    costs: Mapping[str, KernelCosts] = field(default_factory=lambda: DEFAULT_COSTS)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kernels if k not in KERNELS]
        if unknown or "factored" not in self.kernels:
            raise ValueError(f"kernels must be a subset of {KERNELS} holding 'factored', got {self.kernels!r}")
        if "float32" not in self.costs or not all(isinstance(c, KernelCosts) for c in self.costs.values()):
            raise ValueError("costs must map dtype names, float32 among them, to KernelCosts")

    def costs_for(self, dtype: str) -> KernelCosts:
        return self.costs.get(dtype, self.costs["float32"])


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
    layers: tuple[int, ...] = ()  # the mixing layers each expert has factors in
    base_bytes: int = 0  # the weights of every nn.Linear: what a forward reads at least once
    factor_bytes: tuple[int, ...] = ()  # each expert's factors (and dense deltas), read once per forward
    dtype: str = "float32"

    @classmethod
    def of(cls, model: nn.Module, layers: Sequence[MixLinear], n_experts: int, dtype: torch.dtype) -> ExpertCosts:
        """Walk the model's modules once (plans run every decode step, so they never walk them)."""
        fac, dense, mat, rank = [0] * n_experts, [0] * n_experts, [0] * n_experts, [0] * n_experts
        count, nbytes = [0] * n_experts, [0] * n_experts
        size = dtype.itemsize
        for layer in layers:
            i, o = layer.in_features, layer.out_features
            for e, rk in zip(layer.experts, layer.ranks):
                fac[e] += 2 * rk * (i + o)
                mat[e] += 2 * rk * i * o
                rank[e] += rk
                count[e] += 1
                nbytes[e] += rk * (i + o) * size
            for e in layer.dense:
                dense[e] += 2 * i * o
                mat[e] += 2 * i * o
                nbytes[e] += i * o * size
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        base = sum(2 * m.in_features * m.out_features for m in linears)
        mat_bytes = sum(layer.base.weight.numel() for layer in layers) * size
        return cls(base, tuple(fac), tuple(dense), tuple(mat), tuple(rank), len(layers), mat_bytes, tuple(count),
                   sum(m.weight.numel() for m in linears) * size, tuple(nbytes), str(dtype).removeprefix("torch."))

    def flops(self, active: tuple[int, ...], share: Mapping[int, float] | None = None) -> tuple[int, int, int]:
        """(base, extra factored, materialize) FLOPs: per token for the first two, once for the last.

        `share`: the fraction of rows each expert's factors run on (the sparse kernels); default all rows.
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

    path: str  # "core" | "materialized" | one of mixing.KERNELS
    reason: str
    rows: int
    active_experts: tuple[str, ...]
    base_flops_per_token: int
    extra_flops_per_token: int  # the chosen kernel's factor GEMMs per token, summed over layers
    materialize_flops: int  # building W' once (0 when cached)
    materialize_bytes: int
    tokens: int
    base_bytes: int = 0  # the core's linear weights
    active_factor_bytes: int = 0  # the factors of the experts some row uses: read once per forward at least
    estimates: tuple[tuple[str, float], ...] = ()  # (kernel, estimated seconds of its mixing work)

    @property
    def kernel(self) -> str:
        """How the mixing layers add the experts on this path (mixing.KERNELS; W' aside)."""
        return self.path if self.path in KERNELS else "factored"

    @property
    def flop_limit_ratio(self) -> float:
        """1 / (1 + extra/base): the best throughput ratio to the core this path can reach if FLOPs bound it."""
        return 1.0 / (1.0 + self.extra_flops_per_token / max(self.base_flops_per_token, 1))

    @property
    def byte_limit_ratio(self) -> float:
        """base / (base + active factors): the best ratio if reading weights bounds it (a decode step reads the
        core once and each active expert's factors at least once)."""
        return self.base_bytes / max(self.base_bytes + self.active_factor_bytes, 1) if self.base_bytes else 1.0

    @property
    def limit_ratio(self) -> float:
        """The tighter of the FLOP and the byte limit."""
        return min(self.flop_limit_ratio, self.byte_limit_ratio)

    def __str__(self) -> str:
        est = (" est. " + ", ".join(f"{k} {s * 1e3:.2f} ms" for k, s in self.estimates)) if self.estimates else ""
        return (f"{self.path}: {self.reason}{est} | rows={self.rows} active={list(self.active_experts)} "
                f"base={self.base_flops_per_token / 1e6:.1f} MFLOP/tok extra={self.extra_flops_per_token / 1e6:.2f} "
                f"MFLOP/tok (FLOP limit {self.flop_limit_ratio:.3f}x, byte limit {self.byte_limit_ratio:.3f}x) "
                f"materialize={self.materialize_flops / 1e9:.2f} GFLOP {self.materialize_bytes / 2**20:.0f} MiB "
                f"tokens={self.tokens}")


def plan_batch(mix: torch.Tensor | None, tokens: int, step_tokens: int | None, *, experts: Sequence[str],
               costs: ExpertCosts, policy: MixPolicy, is_cached: Callable[[torch.Tensor], bool],
               budget_bytes: int) -> Plan:
    """Choose the path for a batch with this mix ([B, N]) that will process about `tokens` tokens in all.

    core: no expert has weight. materialized: every row shares one mix, and building W' costs less than the
    factored GEMMs over `tokens` (or W' is cached: `is_cached(row)`) and fits `budget_bytes`. Rows with
    different mixes: the kernel of `policy.kernels` whose KernelCosts estimate for this forward (`step_tokens`
    tokens; None = one per row, a decode step) is least. factored: otherwise.
    """
    rows = 0 if mix is None else mix.shape[0]
    active = () if mix is None else tuple(int(i) for i in torch.nonzero((mix != 0).any(0)).flatten())
    base, extra, mat = costs.flops(active)
    mat_bytes = costs.materialize_bytes
    names = tuple(experts[i] for i in active)
    fbytes = sum(costs.factor_bytes[e] for e in active) if costs.factor_bytes else 0

    def mk(path: str, why: str, mf: int = mat, ex: int = extra, est: tuple = ()) -> Plan:
        return Plan(path, why, rows, names, base, ex if path != "core" else 0, mf, mat_bytes, tokens,
                    costs.base_bytes, fbytes if path != "core" else 0, est)

    if not active:
        return mk("core", "no expert has weight", 0)
    if not bool((mix == mix[0]).all()):
        return _choose_kernel(mix, active, step_tokens, costs, policy, mk)
    if is_cached(mix[0]):
        return mk("materialized", "all rows share a mix whose W' is cached", 0)
    if mat_bytes > budget_bytes:
        return mk("factored", "W' would not fit the materialize budget")
    if tokens * extra <= mat:
        return mk("factored", f"building W' costs more than {tokens} tokens of factored GEMMs")
    return mk("materialized", "all rows share a mix; building W' once is cheaper than the factored GEMMs")


def _choose_kernel(mix: torch.Tensor, active: tuple[int, ...], step_tokens: int | None, costs: ExpertCosts,
                   policy: MixPolicy, mk: Callable[..., Plan]) -> Plan:
    """The cheapest kernel of `policy.kernels` for rows with different mixes, by KernelCosts."""
    rows = mix.shape[0]
    tokens = rows if step_tokens is None else step_tokens
    nz = mix[:, list(active)] != 0  # [B, A]
    per_expert = nz.sum(0).tolist()  # rows using each active expert
    elements = [costs.factored_flops[e] // 2 for e in active]  # factor elements r·(in + out), summed over layers
    layers = [costs.layers[e] if costs.layers else costs.mixing_layers for e in active]
    kc = policy.costs_for(costs.dtype)
    shape = dict(layers=costs.mixing_layers, pair_layers=sum(n * lay for n, lay in zip(per_expert, layers)),
                 tokens=tokens, rows=rows, active=float(sum(elements)),
                 pairs=float(sum(n * el for n, el in zip(per_expert, elements))))
    est = tuple((k, kc.seconds(k, **shape)) for k in KERNELS if k in policy.kernels)
    kernel = min(est, key=lambda kv: kv[1])[0]
    density = float(nz.float().mean())
    per_row = float(nz.sum(1).float().mean())
    why = (f"rows have different mixes; a row uses {per_row:.1f} of {len(active)} active experts "
           f"({density:.0%} of the pairs), {tokens / rows:g} tokens per row; the cheapest kernel for "
           f"{costs.dtype}")
    if kernel == "factored":
        return mk("factored", why, est=est)
    share = {e: n / rows for e, n in zip(active, per_expert)}
    return mk(kernel, why, ex=costs.flops(active, share=share)[1], est=est)
