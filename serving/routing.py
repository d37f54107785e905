"""Which mix serves a request: the arm, a per-request override, or the router.

    override given           mix = the override (weights as given, or one-hot)    router "override"
    arm core                 mix = None (the shared core alone)                    router "none"
    arm expert:<name>        mix = one-hot(name)                                   router "none"
    arm static:<label>       mix = None, static = the arm (a stored static merge)   router "none"
    arm twin, router loaded  mix = router.route([input]).weights[0]                router = its kind
    arm twin, no router      mix = uniform 1/N (the router's own "uniform" fallback) router "none"

Every response carries the decision as `"routing": {"arm", "weights": {expert: w}, "router", "overridden"}`,
plus `"rule"` and `"confidence"` (its probability of the top expert) when the router decided (rule: router |
top_k | min_weight | fallback, see router.options) and `"ab"` when an A/B alias picked the arm.

Router calls are batched: requests that arrive while the router is busy are routed together in one
`route()` call on a single worker thread (the router never runs concurrently with itself). If a batch raises,
its rows are routed again one at a time, so a row the router cannot take fails alone. A "hidden"
router gets its own copy of the core model (load_router without `model=`), because the runtime's core
carries per-batch mix state and belongs to the engine's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from serving.arms import ABSplit, Arm
from serving.schemas import RoutingOverride

ROUTE_BATCH = 64


class OverrideError(ValueError):
    """A routing override that names an unknown expert (HTTP 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Decision:
    arm: str
    mix: tuple[float, ...] | None  # [N] in expert order; None = the core alone
    router: str                    # the router's kind, "none" or "override"
    overridden: bool
    rule: str | None = None        # the router's rule for this row, when it decided
    ab: str | None = None          # the A/B alias that picked the arm
    static: str | None = None      # "static:<label>": a static merge serves the request (mix None)
    confidence: float | None = None  # the router's probability of its top expert, when it decided

    def weights(self, experts: Sequence[str]) -> dict[str, float]:
        row = self.mix or (0.0,) * len(experts)
        return {e: round(float(w), 6) for e, w in zip(experts, row)}

    def extension(self, experts: Sequence[str]) -> dict[str, Any]:
        """The response's "routing" object."""
        out: dict[str, Any] = {"arm": self.arm, "weights": self.weights(experts), "router": self.router,
                               "overridden": self.overridden}
        if self.rule is not None:
            out["rule"] = self.rule
        if self.confidence is not None:
            out["confidence"] = round(self.confidence, 6)
        if self.ab is not None:
            out["ab"] = self.ab
        return out


def one_hot(experts: Sequence[str], name: str) -> tuple[float, ...]:
    return tuple(1.0 if e == name else 0.0 for e in experts)


def override_mix(override: RoutingOverride, experts: Sequence[str]) -> tuple[float, ...]:
    """The mix an override asks for; raises OverrideError on an unknown expert."""
    if override.expert is not None:
        if override.expert not in experts:
            raise OverrideError(f"routing.expert: unknown expert {override.expert!r}; experts are "
                                f"{', '.join(experts)}", "routing.expert")
        return one_hot(experts, override.expert)
    weights = override.weights or {}
    unknown = sorted(set(weights) - set(experts))
    if unknown:
        raise OverrideError(f"routing.weights: unknown expert {unknown[0]!r}; experts are {', '.join(experts)}",
                            "routing.weights")
    return tuple(float(weights.get(e, 0.0)) for e in experts)


class RouterBatcher:
    """Routes inputs in batches on one worker thread; `await route(x)` -> (weights row [N], rule, the top
    expert's probability)."""

    def __init__(self, router: Any, max_batch: int = ROUTE_BATCH) -> None:
        self.router = router
        self.max_batch = max_batch
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self._solo = 0  # rows still to route alone, after a batch that raised
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="twinrt-router")

    async def route(self, x: Any) -> tuple[tuple[float, ...], str, float]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((x, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            size = 1 if self._solo else self.max_batch  # after a failed batch, its rows go one by one
            batch, self._pending = self._pending[:size], self._pending[size:]
            self._solo = max(0, self._solo - len(batch))
            try:
                res = await loop.run_in_executor(self._executor, self.router.route, [x for x, _ in batch])
            except Exception as e:  # noqa: BLE001 - routed again one by one: a bad row fails alone
                if len(batch) == 1:
                    if not batch[0][1].done():
                        batch[0][1].set_exception(e)
                else:
                    self._pending = [(x, fut) for x, fut in batch if not fut.done()] + self._pending
                    self._solo = len(batch)
                continue
            for i, (_, fut) in enumerate(batch):
                if not fut.done():
                    fut.set_result((tuple(float(w) for w in res.weights[i]), res.rules[i],
                                    float(res.probs[i].max())))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class RoutingService:
    """Decides each request's mix (see the module docstring)."""

    def __init__(self, experts: Sequence[str], router: Any | None = None) -> None:
        self.experts = list(experts)
        self.router = router
        if router is not None and list(router.experts) != self.experts:
            raise ValueError(f"router experts {router.experts} differ from the model's {self.experts}")
        self.kind = router.kind if router is not None else "none"
        self._batcher = RouterBatcher(router) if router is not None else None

    async def decide(self, arm: Arm, router_input: Any, override: RoutingOverride | None = None,
                     split: ABSplit | None = None) -> Decision:
        ab = split.name if split is not None else None
        if arm.kind == "static":
            if override is not None:
                raise OverrideError(f"a routing override mixes experts; the arm {arm.name} is a static merge, which "
                                    "takes no mix", "routing")
            return Decision(arm.name, None, "none", False, ab=ab, static=arm.name)
        if override is not None:
            return Decision(arm.name, override_mix(override, self.experts), "override", True, ab=ab)
        if arm.kind == "core":
            return Decision(arm.name, None, "none", False, ab=ab)
        if arm.kind == "expert":
            return Decision(arm.name, one_hot(self.experts, arm.expert or ""), "none", False, ab=ab)
        if self._batcher is None:
            n = len(self.experts)
            return Decision(arm.name, (1.0 / n,) * n, "none", False, ab=ab)
        row, rule, confidence = await self._batcher.route(router_input)
        return Decision(arm.name, row, self.kind, False, rule=rule, ab=ab, confidence=confidence)

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
