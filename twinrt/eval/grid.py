"""The parameter grids the static-merge arms are tuned over, and the rule that picks a point.

Each method's parameters are chosen on the validation split: every grid point is merged and scored, and the
point with the highest mean raw task score wins (the first one in grid order on a tie). A method with one
point is not scored on validation. Parameters a grid does not set keep the registry's defaults
(`seed` 0, consensus `tall_lambda` 0.4 and `base` task_arithmetic, ...).

    method           quick (default)                         full
    average          (no parameters)                         (no parameters)
    task_arithmetic  scaling 0.3 0.5 1.0                     scaling 0.2 0.3 0.4 0.5 0.7 1.0
    ties             scaling 1.0 x density 0.2 0.5           scaling 0.5 0.7 1.0 x density 0.1 0.2 0.3 0.5
    dare_linear      scaling 0.3 0.5 x density 0.5           scaling 0.3 0.5 0.7 1.0 x density 0.3 0.5 0.7
    dare_ties        scaling 1.0 x density 0.3 0.5           scaling 0.5 0.7 1.0 x density 0.3 0.5 0.7
    consensus        scaling 0.3 0.5 x k 2                   scaling 0.3 0.5 0.7 1.0 x k 2 3
    pcb              scaling 1.0 x density 0.1 0.3           scaling 0.7 1.0 1.3 x density 0.05 0.1 0.2 0.3
    fisher           floor 1e-6                              floor 1e-8 1e-6 1e-4
    regmean          alpha 0.5 0.9                           alpha 0.1 0.3 0.5 0.7 0.9 1.0
    mats             objective kfac regmean                  objective kfac regmean x scaling 0.3 0.5 1.0
                                                             x alpha 0.9 1.0
    (other methods)  their defaults                          their defaults

fisher, regmean and mats need calibration statistics: the eval computes them once per run (twinrt.eval.
statistics), so their grid points cost a merge each, not a statistics pass.

Points that need more experts than the artifact has (consensus' k) are dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from twinrt.errors import TwinError
from twinrt.merge.registry import METHODS, get_method

DEFAULT_METHODS = ("average", "task_arithmetic", "ties", "dare_ties", "consensus")
GRID_NAMES = ("quick", "full")

Axes = Mapping[str, Sequence[Any]]  # parameter -> values; a grid is their cartesian product

GRIDS: dict[str, dict[str, Axes]] = {
    "quick": {
        "average": {},
        "task_arithmetic": {"scaling": (0.3, 0.5, 1.0)},
        "ties": {"scaling": (1.0,), "density": (0.2, 0.5)},
        "dare_linear": {"scaling": (0.3, 0.5), "density": (0.5,)},
        "dare_ties": {"scaling": (1.0,), "density": (0.3, 0.5)},
        "consensus": {"scaling": (0.3, 0.5), "k": (2,)},
        "pcb": {"scaling": (1.0,), "density": (0.1, 0.3)},
        "fisher": {},
        "regmean": {"alpha": (0.5, 0.9)},
        "mats": {"objective": ("kfac", "regmean")},
    },
    "full": {
        "average": {},
        "task_arithmetic": {"scaling": (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)},
        "ties": {"scaling": (0.5, 0.7, 1.0), "density": (0.1, 0.2, 0.3, 0.5)},
        "dare_linear": {"scaling": (0.3, 0.5, 0.7, 1.0), "density": (0.3, 0.5, 0.7)},
        "dare_ties": {"scaling": (0.5, 0.7, 1.0), "density": (0.3, 0.5, 0.7)},
        "consensus": {"scaling": (0.3, 0.5, 0.7, 1.0), "k": (2, 3)},
        "pcb": {"scaling": (0.7, 1.0, 1.3), "density": (0.05, 0.1, 0.2, 0.3)},
        "fisher": {"floor": (1e-8, 1e-6, 1e-4)},
        "regmean": {"alpha": (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)},
        "mats": {"objective": ("kfac", "regmean"), "scaling": (0.3, 0.5, 1.0), "alpha": (0.9, 1.0)},
    },
}


def parse_methods(text: str) -> tuple[str, ...]:
    """'ties,dare_ties' -> ("ties", "dare_ties"); 'none' -> (); unknown or repeated names are errors."""
    if text.strip() == "none":
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise TwinError("--methods is empty; name merge methods (comma-separated) or 'none'")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise TwinError(f"--methods: unknown merge method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TwinError(f"--methods names {', '.join(dup)} more than once")
    return names


def grid_points(method: str, grid: str, n_experts: int) -> list[dict[str, Any]]:
    """The resolved parameter sets (defaults filled in) of `method` on grid `grid`, in grid order."""
    if grid not in GRIDS:
        raise TwinError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
    m = get_method(method)
    axes = GRIDS[grid].get(method, {})
    keys = list(axes)
    points = [m.resolve(dict(zip(keys, values))) for values in itertools.product(*(axes[k] for k in keys))]
    fits = [p for p in points if m.min_experts(p) <= n_experts]
    if not fits:
        need = min(m.min_experts(p) for p in points)
        raise TwinError(f"{method} needs at least {need} experts ({m.params.min_experts_param} >= {need}); this "
                        f"artifact has {n_experts}")
    return fits


def best_point(means: Sequence[float]) -> int:
    """Index of the highest validation mean; the first one on a tie."""
    if not means:
        raise ValueError("no grid point was scored")
    return max(range(len(means)), key=lambda i: (means[i], -i))
