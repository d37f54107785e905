"""The table of shared-core merge methods, by name, with their parameters and defaults.

One explicit table (no import-time registration): `get_method(name)` raises on an unknown name, and
`MergeMethod.resolve(params)` fills defaults and refuses parameters the method does not take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from twinrt.errors import TwinError
from twinrt.merge import methods


def _fraction(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < float(value) <= 1.0:
        raise TwinError(f"shared.{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _scaling(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not float(value) > 0.0:
        raise TwinError(f"shared.{name} must be a positive number, got {value!r}")
    return float(value)


def _int_at_least_1(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TwinError(f"shared.{name} must be an integer >= 1, got {value!r}")
    return value


def _seed(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TwinError(f"shared.{name} must be a non-negative integer, got {value!r}")
    return value


def _consensus_base(name: str, value: Any) -> str:
    if value not in ("task_arithmetic", "ties"):
        raise TwinError(f"shared.{name} must be 'task_arithmetic' or 'ties', got {value!r}")
    return value


@dataclass(frozen=True)
class Param:
    default: Any
    check: Callable[[str, Any], Any]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: `fn(tau [N, ...], **params) -> merged [...]`.

    `random` methods also take `keep`, a bool mask [N, ...] drawn per tensor from `seed` (see split).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: Mapping[str, Param] = field(default_factory=dict)
    random: bool = False
    summary: str = ""

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validated parameters with defaults filled in; a parameter this method does not take is an error."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            takes = ", ".join(sorted(self.params)) or "no parameters"
            raise TwinError(f"shared.method {self.name!r} does not take {', '.join(unknown)} (it takes {takes})")
        return {k: p.check(k, given[k]) if k in given else p.default for k, p in self.params.items()}

    def trim_density(self, params: Mapping[str, Any]) -> float | None:
        """The density this method magnitude-trims each τ_i to (a whole-tensor statistic), or None."""
        if self.name == "ties" or (self.name == "consensus" and params.get("base") == "ties"):
            return float(params["density"])
        return None

    def merge(self, tau: torch.Tensor, params: Mapping[str, Any], keep: torch.Tensor | None = None,
              *, chunk: int = 1 << 20) -> torch.Tensor:
        """Apply the method to `tau: [N, ...]` with resolved params (and keep-masks if random).

        Large tensors are merged `chunk` columns (of the flattened tensor) at a time, so the method's
        [N, ...]-sized temporaries stay small whatever the tensor's size: every method is elementwise once
        the magnitude-trim thresholds, the only whole-tensor statistic, are computed on the whole τ first.
        """
        kwargs = {k: v for k, v in params.items() if k != "seed"}
        if self.random:
            if keep is None:
                raise ValueError(f"merge method {self.name} needs keep masks")
        n, shape = tau.shape[0], tau.shape[1:]
        flat = tau.reshape(n, -1)  # [N, P]
        density = self.trim_density(params)
        if density is not None and density < 1.0:
            kwargs["threshold"] = methods.trim_thresholds(flat, density)
        keep_flat = keep.reshape(n, -1) if keep is not None else None
        p = flat.shape[1]
        if p <= chunk:
            if keep_flat is not None:
                kwargs["keep"] = keep_flat
            return self.fn(flat, **kwargs).reshape(shape)
        out = torch.empty(p, dtype=tau.dtype, device=tau.device)
        for s in range(0, p, chunk):
            if keep_flat is not None:
                kwargs["keep"] = keep_flat[:, s:s + chunk]
            out[s:s + chunk] = self.fn(flat[:, s:s + chunk], **kwargs)
        return out.reshape(shape)


_SCALING_1 = Param(1.0, _scaling)
_SCALING_03 = Param(0.3, _scaling)
_SEED = Param(0, _seed)

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("average", methods.average, {}, summary="mean of the experts"),
        MergeMethod("task_arithmetic", methods.task_arithmetic, {"scaling": _SCALING_03},
                    summary="λ·Σ τ_i"),
        MergeMethod("ties", methods.ties, {"scaling": _SCALING_1, "density": Param(0.2, _fraction)},
                    summary="trim, elect sign, disjoint mean"),
        MergeMethod("dare_linear", methods.dare_linear,
                    {"scaling": _SCALING_03, "density": Param(0.5, _fraction), "seed": _SEED},
                    random=True, summary="random drop + rescale, then λ·Σ"),
        MergeMethod("dare_ties", methods.dare_ties,
                    {"scaling": _SCALING_1, "density": Param(0.5, _fraction), "seed": _SEED},
                    random=True, summary="random drop + rescale, then sign election and disjoint mean"),
        MergeMethod("consensus", methods.consensus,
                    {"scaling": _SCALING_03, "k": Param(2, _int_at_least_1),
                     "tall_lambda": Param(0.4, _scaling), "base": Param("task_arithmetic", _consensus_base),
                     "density": Param(1.0, _fraction)},
                    summary="TALL-mask consensus: keep weights at least k experts need"),
    )
}


def get_method(name: str) -> MergeMethod:
    """The method registered under `name`; an unknown name is a TwinError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise TwinError(f"unknown shared.method {name!r}; known: {', '.join(METHODS)}") from None
