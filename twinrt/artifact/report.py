"""Human-readable summaries of a manifest (used by `twinrt split` and `twinrt inspect`)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from twinrt.artifact.manifest import DenseInfo, FactorInfo, Manifest


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


def summary_table(m: Manifest) -> Table:
    """One row per expert: source kind, ranks, kept energy, stored bytes and their share of a full model."""
    t = Table(title=f"core: {m.shared.method} {m.shared.params or ''}".rstrip(), title_justify="left")
    for col in ("expert", "from", "rank mean/max", "energy mean/min", "factors", "dense (tensors)", "% of full"):
        t.add_column(col, justify="left" if col in ("expert", "from") else "right", no_wrap=True)
    for s in expert_stats(m):
        total = s.factor_bytes + s.dense_bytes
        t.add_row(s.name, s.kind, f"{s.mean_rank:.1f}/{s.max_rank}", f"{s.mean_energy:.3f}/{s.min_energy:.3f}",
                  human_bytes(s.factor_bytes), f"{human_bytes(s.dense_bytes)} ({s.dense_tensors})",
                  f"{100 * total / m.sizes.full_expert:.2f}%")
    mode = f"rank {m.exclusive.rank}" if m.exclusive.rank else f"energy {m.exclusive.energy}"
    t.caption = (f"core {human_bytes(m.sizes.core)} ({m.exclusive.dtype}) = one full expert; exclusive {mode}, "
                 f"svd {m.exclusive.svd}")
    t.caption_justify = "left"
    return t
