"""The table of shared-core merge methods, by name, each with the typed model of its parameters.

One explicit table (no import-time registration): `get_method(name)` raises on an unknown name. Every method
declares its parameters as a `MethodParams` model (fields with defaults and checks, as mergekit's
ConfigParameterDef), and on it what the rest of twinrt asks of a method, so nothing elsewhere tests a name:

    params.trim_density()          the density each τ_i is magnitude-trimmed to before merging, or None
    params.min_experts_param       a parameter the number of experts must reach (consensus' k), or None
    params.statistics()            the calibration statistics it needs per tensor (twinrt.merge.stats), or ∅
    method.prepare(flat, params)   statistics of the whole tensor the method needs (TIES' trim thresholds,
                                   PCB's clip and drop bounds), computed once and passed to every chunk
    method.elementwise             False: the method solves per matrix and sees each tensor whole, unchunked
    method.reports                 the method also returns a per-tensor report (MaTS: CG steps, residual)

`MergeMethod.resolve(given)` fills defaults and refuses parameters the method does not take; `check(params, n)`
refuses parameters that cannot merge n experts; `statistics(params)` names the data a split must collect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BeforeValidator, ValidationError

from twinrt.errors import TwinError
from twinrt.merge import datamethods, methods
from twinrt.merge.stats import FISHER, GRAM_IN, GRAM_OUT, TensorStats
from twinrt.validation import Frozen


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fraction(value: Any) -> float:
    if not _number(value) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"must be a number in (0, 1], got {value!r}")
    return float(value)


def _positive(value: Any) -> float:
    if not _number(value) or not float(value) > 0.0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def _int_at_least_1(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"must be an integer >= 1, got {value!r}")
    return value


def _seed(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"must be a non-negative integer, got {value!r}")
    return value


def _outlier_share(value: Any) -> float:
    if not _number(value) or not 0.0 <= float(value) < 0.5:
        raise ValueError(f"must be a number in [0, 0.5), got {value!r}")
    return float(value)


def _nonnegative(value: Any) -> float:
    if not _number(value) or not float(value) >= 0.0:
        raise ValueError(f"must be a number >= 0, got {value!r}")
    return float(value)


def _unit(value: Any) -> float:
    if not _number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"must be a number in [0, 1], got {value!r}")
    return float(value)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be {' or '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    return check


Fraction = Annotated[float, BeforeValidator(_fraction)]  # in (0, 1]
Positive = Annotated[float, BeforeValidator(_positive)]  # > 0
AtLeast1 = Annotated[int, BeforeValidator(_int_at_least_1)]
Seed = Annotated[int, BeforeValidator(_seed)]  # >= 0
OutlierShare = Annotated[float, BeforeValidator(_outlier_share)]  # in [0, 0.5)
NonNegative = Annotated[float, BeforeValidator(_nonnegative)]  # >= 0
Unit = Annotated[float, BeforeValidator(_unit)]  # in [0, 1]
MatsObjective = Annotated[Literal["kfac", "regmean"], BeforeValidator(_one_of("kfac", "regmean"))]
ConsensusBase = Annotated[Literal["task_arithmetic", "ties"], BeforeValidator(_one_of("task_arithmetic", "ties"))]


class MethodParams(Frozen):
    """A merge method's parameters: no parameters, no magnitude trim, any number of experts."""

    min_experts_param: ClassVar[str | None] = None

    def trim_density(self) -> float | None:
        """The density this method magnitude-trims each τ_i to (a whole-tensor statistic), or None."""
        return None

    def statistics(self) -> frozenset[str]:
        """The calibration statistics (`twinrt.merge.stats.KINDS`) the method needs for every tensor."""
        return frozenset()


class TaskArithmeticParams(MethodParams):
    scaling: Positive = 0.3


class TiesParams(MethodParams):
    scaling: Positive = 1.0
    density: Fraction = 0.2

    def trim_density(self) -> float | None:
        return self.density


class DareLinearParams(MethodParams):
    scaling: Positive = 0.3
    density: Fraction = 0.5
    seed: Seed = 0  # keep masks are drawn per tensor from this (see twinrt.merge.tensor)


class DareTiesParams(MethodParams):
    scaling: Positive = 1.0
    density: Fraction = 0.5
    seed: Seed = 0


class ConsensusParams(MethodParams):
    min_experts_param: ClassVar[str | None] = "k"  # k experts must agree, so there must be k

    scaling: Positive = 0.3
    k: AtLeast1 = 2
    tall_lambda: Positive = 0.4
    base: ConsensusBase = "task_arithmetic"
    density: Fraction = 1.0  # the trim of base "ties"

    def trim_density(self) -> float | None:
        return self.density if self.base == "ties" else None


class PcbParams(MethodParams):
    scaling: Positive = 1.0  # λ on the merged task vector
    density: Fraction = 0.1  # the paper's ratio r: the share of each τ_i's entries kept (by balancing score)
    outlier: OutlierShare = 0.0001  # the share of |τ_i| clipped at either end before scoring


class FisherParams(MethodParams):
    floor: Positive = 1e-6  # added to every Fisher entry (Matena & Raffel's fisher floor)

    def statistics(self) -> frozenset[str]:
        return frozenset({FISHER})


class RegmeanParams(MethodParams):
    alpha: Unit = 0.9  # the factor on the Grams' off-diagonal entries (1: exact least squares)

    def statistics(self) -> frozenset[str]:
        return frozenset({GRAM_IN})


class MatsParams(MethodParams):
    scaling: Positive = 0.3  # λ of the task-arithmetic start (and of tensors with no system to solve)
    objective: MatsObjective = "kfac"  # "kfac": Σ B_i W G_i = Σ B_i W_i G_i; "regmean": W Σ G_i = Σ W_i G_i
    alpha: Unit = 1.0  # the factor on the input Grams' off-diagonal entries
    iterations: AtLeast1 = 100  # conjugate-gradient steps at most
    tolerance: NonNegative = 1e-6  # stop once the residual is this share of the right-hand side's norm

    def statistics(self) -> frozenset[str]:
        return frozenset({GRAM_IN, GRAM_OUT}) if self.objective == "kfac" else frozenset({GRAM_IN})


def trim_statistics(flat: torch.Tensor, params: MethodParams) -> dict[str, torch.Tensor]:
    """The default whole-tensor statistics: the magnitude-trim thresholds, where the method trims."""
    density = params.trim_density()
    if density is None or density >= 1.0:
        return {}
    return {"threshold": methods.trim_thresholds(flat, density)}


def pcb_statistics(flat: torch.Tensor, params: MethodParams) -> dict[str, torch.Tensor]:
    return methods.pcb_statistics(flat, density=params.density, outlier=params.outlier)


Prepare = Callable[[torch.Tensor, MethodParams], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Merged:
    """A merged task vector and what the method reports about computing it (empty for most methods)."""

    tau: torch.Tensor
    report: dict[str, Any]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: `fn(tau [N, ...], **params) -> merged [...]`, its parameters declared by `params`.

    `random` methods also take `keep`, a bool mask [N, ...] drawn per tensor from `seed` (see merge.tensor).
    `prepare(flat [N, P], params)` gives the whole-tensor statistics `fn` takes as further keyword arguments.
    Methods whose params declare `statistics()` also take `stats`, the tensor's `TensorStats`. Elementwise
    methods see `[N, P]` slices of columns of the flattened tensor, the others the whole `[N, *shape]`;
    `reports` methods return `(merged, report)`.
    """

    name: str
    fn: Callable[..., Any]
    params: type[MethodParams] = MethodParams
    random: bool = False
    summary: str = ""
    prepare: Prepare = trim_statistics
    elementwise: bool = True
    reports: bool = False

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validated parameters with defaults filled in; a parameter this method does not take is an error."""
        unknown = sorted(set(given) - set(self.params.model_fields))
        if unknown:
            takes = ", ".join(sorted(self.params.model_fields)) or "no parameters"
            raise TwinError(f"shared.method {self.name!r} does not take {', '.join(unknown)} (it takes {takes})")
        try:
            return self.params.model_validate(dict(given)).model_dump()
        except ValidationError as e:
            first = e.errors()[0]
            raise TwinError(f"shared.{first['loc'][0]} {first['msg'].removeprefix('Value error, ')}") from None

    def min_experts(self, params: Mapping[str, Any]) -> int:
        """The fewest experts resolved `params` can merge."""
        field = self.params.min_experts_param
        return 1 if field is None else int(params[field])

    def check(self, params: Mapping[str, Any], n_experts: int) -> None:
        """Refuse (TwinError) resolved `params` that cannot merge `n_experts` experts."""
        field = self.params.min_experts_param
        if field is not None and self.min_experts(params) > n_experts:
            raise TwinError(f"shared.{field}={params[field]} needs at least that many experts (have {n_experts})")

    def statistics(self, params: Mapping[str, Any]) -> frozenset[str]:
        """The calibration statistics resolved `params` need (empty: a data-free merge)."""
        return self.params.model_validate(dict(params)).statistics()

    def merge(self, tau: torch.Tensor, params: Mapping[str, Any], keep: torch.Tensor | None = None,
              *, stats: TensorStats | None = None, chunk: int = 1 << 20) -> torch.Tensor:
        """The merged task vector of `tau: [N, ...]` (see `apply`)."""
        return self.apply(tau, params, keep, stats=stats, chunk=chunk).tau

    def apply(self, tau: torch.Tensor, params: Mapping[str, Any], keep: torch.Tensor | None = None,
              *, stats: TensorStats | None = None, chunk: int = 1 << 20) -> Merged:
        """Apply the method to `tau: [N, ...]` with resolved params (keep-masks if random, the tensor's
        statistics if it needs data: `TensorStats()` for a tensor that has none).

        Large tensors are merged `chunk` columns (of the flattened tensor) at a time, so the method's
        [N, ...]-sized temporaries stay small whatever the tensor's size: an elementwise method is elementwise
        once the whole-tensor statistics (`prepare`: trim thresholds, PCB's bounds) are computed on the whole τ.
        """
        p_model = self.params.model_validate(dict(params))
        kwargs = p_model.model_dump(exclude={"seed"})  # the seed only draws the keep masks
        if self.random and keep is None:
            raise ValueError(f"merge method {self.name} needs keep masks")
        if p_model.statistics():
            if stats is None:
                raise ValueError(f"merge method {self.name} needs calibration statistics")
            stats = stats.to(tau.device)
        else:
            stats = None
        if not self.elementwise:
            out = self.fn(tau, **kwargs, **({} if stats is None else {"stats": stats}))
            return Merged(*out) if self.reports else Merged(out, {})
        n, shape = tau.shape[0], tau.shape[1:]
        flat = tau.reshape(n, -1)  # [N, P]
        kwargs.update(self.prepare(flat, p_model))
        keep_flat = keep.reshape(n, -1) if keep is not None else None
        p = flat.shape[1]
        out = torch.empty(p, dtype=tau.dtype, device=tau.device)
        for s in range(0, p, chunk):
            if keep_flat is not None:
                kwargs["keep"] = keep_flat[:, s:s + chunk]
            if stats is not None:
                kwargs["stats"] = stats.columns(s, s + chunk)
            out[s:s + chunk] = self.fn(flat[:, s:s + chunk], **kwargs)
        return Merged(out.reshape(shape), {})


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("average", methods.average, summary="mean of the experts"),
        MergeMethod("task_arithmetic", methods.task_arithmetic, TaskArithmeticParams, summary="λ·Σ τ_i"),
        MergeMethod("ties", methods.ties, TiesParams, summary="trim, elect sign, disjoint mean"),
        MergeMethod("dare_linear", methods.dare_linear, DareLinearParams, random=True,
                    summary="random drop + rescale, then λ·Σ"),
        MergeMethod("dare_ties", methods.dare_ties, DareTiesParams, random=True,
                    summary="random drop + rescale, then sign election and disjoint mean"),
        MergeMethod("consensus", methods.consensus, ConsensusParams,
                    summary="TALL-mask consensus: keep weights at least k experts need"),
        MergeMethod("pcb", methods.pcb, PcbParams, prepare=pcb_statistics,
                    summary="parameter competition balancing: intra/inter-task scores, drop, rescale"),
        MergeMethod("fisher", datamethods.fisher, FisherParams,
                    summary="diagonal-Fisher-weighted average (needs calibration data)"),
        MergeMethod("regmean", datamethods.regmean, RegmeanParams, elementwise=False,
                    summary="per linear layer least squares on the experts' input Grams (needs calibration data)"),
        MergeMethod("mats", datamethods.mats, MatsParams, elementwise=False, reports=True,
                    summary="conjugate gradient on the K-FAC or RegMean system from task arithmetic "
                            "(needs calibration data)"),
    )
}


def get_method(name: str) -> MergeMethod:
    """The method registered under `name`; an unknown name is a TwinError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise TwinError(f"unknown shared.method {name!r}; known: {', '.join(METHODS)}") from None
