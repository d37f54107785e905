"""Human-readable summaries of a manifest (used by `twinrt split` and `twinrt inspect`)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from twinrt.artifact.manifest import STATIC_PREFIX, DenseInfo, FactorInfo, Manifest


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class ExpertStats:
    name: str
    kind: str
    factored: int  # tensors with rank > 0
    mean_rank: float
    max_rank: int
    mean_energy: float  # over factored tensors, rank-0 (zero-delta) tensors excluded
    min_energy: float
    dense_tensors: int
    factor_bytes: int
    dense_bytes: int
    ratio: float  # full expert bytes / this expert's stored bytes


def expert_stats(m: Manifest) -> list[ExpertStats]:
    out = []
    for e in m.experts:
        facts = [t.experts[e.name] for t in m.tensors.values() if t.role == "factored"]
        facts = [f for f in facts if isinstance(f, FactorInfo) and f.rank > 0]
        dense = [t.experts[e.name] for t in m.tensors.values() if t.role == "dense"]
        dense_n = sum(1 for d in dense if isinstance(d, DenseInfo) and d.stored)
        size = m.sizes.experts[e.name]
        stored = size.factors + size.dense
        out.append(ExpertStats(
            name=e.name, kind=e.kind, factored=len(facts),
            mean_rank=sum(f.rank for f in facts) / max(len(facts), 1),
            max_rank=max((f.rank for f in facts), default=0),
            mean_energy=sum(f.energy for f in facts) / max(len(facts), 1),
            min_energy=min((f.energy for f in facts), default=1.0),
            dense_tensors=dense_n, factor_bytes=size.factors, dense_bytes=size.dense,
            ratio=m.sizes.full_expert / stored if stored else float("inf"),
        ))
    return out


PER_EXPERT_ROWS = 16  # above this many experts the table shows one row per source kind and the extremes


def summary_table(m: Manifest, per_expert: bool | None = None) -> Table:
    """One row per expert (source kind, ranks, kept energy, stored bytes and their share of a full model) and a
    total; with more than PER_EXPERT_ROWS experts (unless `per_expert`), one row per source kind instead, over
    its experts (rank mean/max, energy mean/min, bytes summed), naming the experts of least kept energy."""
    stats = expert_stats(m)
    per_expert = len(stats) <= PER_EXPERT_ROWS if per_expert is None else per_expert
    t = Table(title=f"core: {m.shared.method} {m.shared.params or ''}".rstrip(), title_justify="left")
    for col in ("expert" if per_expert else "experts", "from", "rank mean/max", "energy mean/min", "factors",
                "dense (tensors)", "% of full"):
        t.add_column(col, justify="left" if col in ("expert", "experts", "from") else "right", no_wrap=True)
    full = m.sizes.full_expert

    def row(label: str, group: list[ExpertStats], kind: str) -> None:
        n = len(group)
        total = sum(s.factor_bytes + s.dense_bytes for s in group)
        t.add_row(label, kind, f"{sum(s.mean_rank for s in group) / n:.1f}/{max(s.max_rank for s in group)}",
                  f"{sum(s.mean_energy for s in group) / n:.3f}/{min(s.min_energy for s in group):.3f}",
                  human_bytes(sum(s.factor_bytes for s in group)),
                  f"{human_bytes(sum(s.dense_bytes for s in group))} ({sum(s.dense_tensors for s in group)})",
                  f"{100 * total / (n * full):.2f}%")

    if per_expert:
        for s in stats:
            row(s.name, [s], s.kind)
    else:
        for kind in sorted({s.kind for s in stats}):
            group = [s for s in stats if s.kind == kind]
            row(f"{len(group)} ({group[0].name} … {group[-1].name})" if len(group) > 1 else group[0].name,
                group, kind)
    if len(stats) > 1 and (per_expert or len({s.kind for s in stats}) > 1):
        t.add_section()
        row(f"all {len(stats)}", stats, ", ".join(sorted({s.kind for s in stats})))
    mode = f"rank {m.exclusive.rank}" if m.exclusive.rank else f"energy {m.exclusive.energy}"
    caption = (f"core {human_bytes(m.sizes.core)} ({m.exclusive.dtype}) = one full expert; exclusive {mode}, "
               f"svd {m.exclusive.svd}; % of full: stored bytes over as many full models")
    if not per_expert:
        low = sorted(stats, key=lambda s: (s.min_energy, s.name))[:3]
        caption += "\nleast energy kept: " + ", ".join(f"{s.name} {s.min_energy:.3f}" for s in low)
        caption += " (twinrt inspect --experts lists every expert)"
    t.caption = caption
    t.caption_justify = "left"
    return t


def static_table(m: Manifest) -> Table | None:
    """One row per static-merge arm: its method and parameters, and what its difference from the core costs
    (exact factors, dense deltas, their share of a full model); None without static merges."""
    if not m.statics:
        return None
    t = Table(title="static merges (arms static:LABEL)", title_justify="left")
    for col in ("arm", "method", "params", "exact factors (tensors)", "dense (tensors)", "% of full"):
        t.add_column(col, justify="left" if col in ("arm", "method", "params") else "right", no_wrap=col != "params")
    for st in m.statics:
        factored = sum(1 for i in st.tensors.values() if isinstance(i, FactorInfo) and i.rank > 0)
        dense = sum(1 for i in st.tensors.values() if isinstance(i, DenseInfo) and i.stored)
        params = ", ".join(f"{k}={v}" for k, v in st.params.items())
        t.add_row(STATIC_PREFIX + st.label, st.method, params, f"{human_bytes(st.size.factors)} ({factored})",
                  f"{human_bytes(st.size.dense)} ({dense})",
                  f"{100 * (st.size.factors + st.size.dense) / m.sizes.full_expert:.2f}%")
    return t
