"""Arms: what the request's `model` field names, and the A/B aliases that split traffic between arms.

    twin            the router picks the mix for each request (no router: the uniform mix, see serving.routing)
    core            the shared core alone (the static merge): mix = None
    expert:<name>   one expert: mix = one-hot(name)
    static:<label>  a static merge stored in the artifact (`twinrt static add`): the core plus its exact
                    difference from the core, no expert mix
    <alias>         an A/B split given at start, e.g. `--ab twin=50,core=50` (alias name "ab" by default)

An A/B alias picks an arm per request with probability weight / Σ weights. With a `user` field the pick is
sticky: sha256(alias + "\\0" + user) mapped to [0, 1) chooses the arm, so a user sees the same arm on every
request and every server process. Without `user` the pick is random.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from twinrt.errors import TwinError

EXPERT_PREFIX = "expert:"
STATIC_PREFIX = "static:"
DEFAULT_AB_NAME = "ab"
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class UnknownModel(LookupError):
    """The `model` field names no arm or alias (HTTP 404, code model_not_found)."""


@dataclass(frozen=True)
class Arm:
    name: str                                   # "twin" | "core" | "expert:<name>" | "static:<label>"
    kind: Literal["twin", "core", "expert", "static"]
    expert: str | None = None


def parse_arm(name: str, experts: Sequence[str], statics: Sequence[str] = ()) -> Arm:
    """The arm a model name denotes (`statics`: the artifact's "static:<label>" names); raises UnknownModel
    naming the valid ones."""
    if name == "twin":
        return Arm("twin", "twin")
    if name == "core":
        return Arm("core", "core")
    if name.startswith(EXPERT_PREFIX) and name[len(EXPERT_PREFIX):] in experts:
        return Arm(name, "expert", name[len(EXPERT_PREFIX):])
    if name.startswith(STATIC_PREFIX) and name in statics:
        return Arm(name, "static")
    raise UnknownModel(f"The model {name!r} does not exist. Available: "
                       + ", ".join(arm_names(experts, statics)))


def arm_names(experts: Sequence[str], statics: Sequence[str] = ()) -> list[str]:
    return ["twin", "core", *(EXPERT_PREFIX + e for e in experts), *statics]


@dataclass(frozen=True)
class ABSplit:
    """An alias that sends each request to one of `arms` with probability weight / Σ weights."""

    name: str
    arms: tuple[Arm, ...]
    weights: tuple[float, ...]

    def pick(self, user: str | None, rng: random.Random) -> Arm:
        point = sticky_point(self.name, user) if user else rng.random()
        return pick_by_point(self.arms, self.weights, point)


def sticky_point(alias: str, user: str) -> float:
    """A stable point in [0, 1) for (alias, user): the first 8 bytes of a sha256, as a fraction."""
    digest = hashlib.sha256(f"{alias}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_by_point(arms: Sequence[Arm], weights: Sequence[float], point: float) -> Arm:
    """The arm whose slice of [0, 1) (slices in order, sized weight / Σ weights) holds `point`."""
    total = sum(weights)
    acc = 0.0
    for arm, w in zip(arms, weights):
        acc += w / total
        if point < acc:
            return arm
    return arms[-1]


def parse_ab(spec: str, experts: Sequence[str], name: str = DEFAULT_AB_NAME, statics: Sequence[str] = ()) -> ABSplit:
    """`twin=50,core=50` (arm=weight, weights > 0, any scale; `static:<label>` arms too) -> ABSplit; raises
    TwinError on a bad spec."""
    if not _ALIAS.match(name) or name in arm_names(experts, statics) or name.startswith(EXPERT_PREFIX) \
            or name.startswith(STATIC_PREFIX):
        raise TwinError(f"--ab-name {name!r} must be 1-64 letters, digits, '_', '.', '-' and not an arm name")
    arms, weights = [], []
    for part in spec.split(","):
        arm_name, eq, value = part.strip().rpartition("=")
        if not eq or not arm_name:
            raise TwinError(f"--ab {spec!r}: each part must be ARM=WEIGHT, e.g. twin=50,core=50")
        try:
            arm = parse_arm(arm_name.strip(), experts, statics)
        except UnknownModel:
            raise TwinError(f"--ab {spec!r}: unknown arm {arm_name!r}; arms are "
                            + ", ".join(arm_names(experts, statics))) from None
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not w > 0 or w == float("inf"):
            raise TwinError(f"--ab {spec!r}: the weight of {arm_name!r} must be a positive number, got {value!r}")
        if arm in arms:
            raise TwinError(f"--ab {spec!r}: arm {arm_name!r} is listed twice")
        arms.append(arm)
        weights.append(w)
    if len(arms) < 2:
        raise TwinError(f"--ab {spec!r}: an A/B split needs at least two arms")
    return ABSplit(name, tuple(arms), tuple(weights))


class ArmTable:
    """The model names a server answers to: the arms, plus the A/B aliases."""

    def __init__(self, experts: Sequence[str], splits: Sequence[ABSplit] = (), seed: int | None = None,
                 statics: Sequence[str] = ()) -> None:
        self.experts = list(experts)
        self.statics = list(statics)
        self.splits = {s.name: s for s in splits}
        self._rng = random.Random(seed)

    def model_ids(self) -> list[str]:
        return arm_names(self.experts, self.statics) + list(self.splits)

    def adopt_rng(self, other: ArmTable) -> None:
        """Continue `other`'s A/B picks (a table rebuilt for a new expert set keeps the seeded sequence)."""
        self._rng = other._rng

    def resolve(self, model: str, user: str | None = None) -> tuple[Arm, ABSplit | None]:
        """(the arm that serves this request, the A/B split that chose it or None)."""
        split = self.splits.get(model)
        if split is not None:
            return split.pick(user, self._rng), split
        try:
            return parse_arm(model, self.experts, self.statics), None
        except UnknownModel:
            raise UnknownModel(f"The model {model!r} does not exist. Available: "
                               + ", ".join(self.model_ids())) from None
