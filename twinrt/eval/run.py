"""`twinrt eval`: every arm on every task of a suite's test split: the A/B table of quality per arm.

Arms, in table order:

    expert:<name>     the original expert (base + its LoRA, or its full fine-tuned weights), exactly
    merge:<method>    a static merge of the original experts, parameters chosen on the validation split
                      (see `twinrt.eval.grid`); the data-based methods (fisher, regmean, mats) merge with
                      statistics of each expert's own task's train split, computed once (twinrt.eval.statistics)
    core              the artifact's shared core (the static merge the split stored)
    twin:oracle       the twin with each example's own expert, one-hot
    twin:router       the twin with the artifact's trained router (when a `Routing` is given)

With `twin_ranks`, the twin on each core (the artifact's and every merge arm's) is rebuilt at those exclusive
ranks until it reaches 0.99 of the experts' mean normalized score (twinrt.eval.twin_rank): the rank each core
needs, which a better core lowers.

Every finished step (an arm; a merge arm with its grid and its rank search; the statistics' cost) goes into a
`Journal` (twinrt.eval.journal): on disk, a stopped run resumes from it and runs only the steps it lacks.

All arms decode greedily through the same Engine (`twinrt.eval.generation`). Stored bytes per arm: an expert
its own files (adapter, or full weights); a merge and the core one model (`sizes.core`); the twin its core
plus every expert's factors and dense deltas, plus the router for twin:router.

This module imports no router: the caller passes `Routing(label, route)`, so `twinrt` keeps to its one
direction of imports (the CLI binds `router` in).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from twinrt.artifact.manifest import MANIFEST
from twinrt.errors import TwinError
from twinrt.eval.generation import Generated, PlainModel, Runner, generate
from twinrt.eval.grid import DEFAULT_METHODS, best_point, grid_points
from twinrt.eval.journal import Journal, examples_digest, options_json
from twinrt.eval.metrics import task_score
from twinrt.eval.statistics import eval_statistics, needed_statistics, suite_calibration
from twinrt.eval.tasks import Example, Messages, Task, TaskSuite, task_experts
from twinrt.eval.twin_rank import RankSearch, search_rank
from twinrt.eval.weights import Sources, Weights, expert_weights, merge_weights, sources_of
from twinrt.merge import TensorStats
from twinrt.merge.registry import get_method
from twinrt.runtime.model import TwinModel
from twinrt.sources.checkpoint import SafetensorsDir
from twinrt.split.run import decoder_linear_weights
from twinrt.split.statistics import ExpertCost

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(k)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class EvalOptions:
    max_new_tokens: int = 24
    batch_size: int = 16
    limit: int | None = None  # test examples per task (the first ones); None = all
    val_limit: int | None = None  # validation examples per task for the grid; None = same as `limit`
    methods: tuple[str, ...] = DEFAULT_METHODS
    grid: str = "quick"
    task_expert: Mapping[str, str] = field(default_factory=dict)  # task -> expert where names differ
    base: Path | None = None  # where the artifact's base is now, if it moved
    expert_paths: Mapping[str, Path] = field(default_factory=dict)  # expert -> where it is now
    check_fingerprints: bool = True
    calibration_samples: int = 64  # train examples per expert for the data-based methods' statistics
    twin_ranks: tuple[int, ...] = ()  # exclusive ranks tried for the twin on each core (twinrt.eval.twin_rank)
    split: str = "test"  # the split every arm is scored on ("test_ood": the out-of-template phrasings)

    def __post_init__(self) -> None:
        for key in ("max_new_tokens", "batch_size", "limit", "val_limit", "calibration_samples"):
            v = getattr(self, key)
            if v is not None and not _count(v):
                raise TwinError(f"--{key.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if not isinstance(self.split, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.split):
            raise TwinError(f"--split {self.split!r} must name a split file DIR/<task>/<split>.jsonl: letters, digits, "
                            "'_' or '-'")
        if self.split in ("train", "validation"):
            raise TwinError(f"--split {self.split}: the merges' parameters are chosen on validation and the data "
                            "methods' statistics come from train; score on test or another held-out split")
        bad = [r for r in self.twin_ranks if not _count(r)]
        if bad:
            raise TwinError(f"--twin-ranks must be integers >= 1, got {bad[0]!r}")
        for m in self.methods:
            get_method(m)

    @property
    def validation_limit(self) -> int | None:
        return self.val_limit if self.val_limit is not None else self.limit


@dataclass(frozen=True)
class Routing:
    """A trained router as the eval sees it: `route(prompts) -> weights [B, N]` in the artifact's expert order."""

    label: str
    route: Callable[[Sequence[Messages]], torch.Tensor]
    stored_bytes: int = 0


@dataclass
class ArmResult:
    name: str
    kind: str  # "expert" | "merge" | "core" | "twin"
    scores: dict[str, float]  # task -> raw score on the test split
    predictions: dict[str, list[str]]
    tokens: int
    seconds: float
    stored_bytes: int
    params: dict[str, Any] | None = None  # merge arms: the chosen parameters

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Selection:
    """A merge method's grid on the validation split: one row of task scores per point."""

    method: str
    points: list[dict[str, Any]]
    val_scores: list[dict[str, float]]  # empty when the grid has one point (nothing to choose)
    chosen: int

    @property
    def val_means(self) -> list[float]:
        return [sum(s.values()) / len(s) for s in self.val_scores]


@dataclass(frozen=True)
class RouterStats:
    label: str
    accuracy: float  # share of test examples whose own expert got strictly the largest weight
    per_task: dict[str, float]
    seconds: float  # routing time for the whole test split (not in twin:router's tokens/s)


@dataclass
class EvalResult:
    artifact: str
    tasks_dir: str
    tasks: list[Task]
    expert_of_task: dict[str, str]
    examples: dict[str, int]  # test examples per task
    arms: list[ArmResult]
    selections: list[Selection]
    router: RouterStats | None
    options: EvalOptions
    statistics: list[ExpertCost] = field(default_factory=list)  # the data-based methods' statistics pass
    twin_ranks: list[RankSearch] = field(default_factory=list)  # the exclusive rank each core's twin needs

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """arm -> task -> raw score."""
        return {a.name: dict(a.scores) for a in self.arms}

    @property
    def own_arm(self) -> dict[str, str]:
        """task -> the arm of its own expert (`expert:<name>`), the denominator of its normalized scores."""
        return {t: f"expert:{e}" for t, e in self.expert_of_task.items()}


def one_hot_mixes(labels: Sequence[str], experts: Sequence[str]) -> torch.Tensor:
    """[B, N] with a 1 in each row's expert column."""
    w = torch.zeros(len(labels), len(experts))
    for i, e in enumerate(labels):
        w[i, experts.index(e)] = 1.0
    return w


def router_hits(weights: torch.Tensor, labels: Sequence[str], experts: Sequence[str]) -> list[bool]:
    """Per row: did the row's own expert get strictly the largest weight? (uniform or all-zero rows: no)."""
    hits = []
    for row, e in zip(weights, labels, strict=True):  # row: [N]
        j = experts.index(e)
        others = torch.cat([row[:j], row[j + 1:]])
        hits.append(bool(row[j] > others.max()) if len(others) else bool(row[j] > 0))
    return hits


def _score(tasks: list[Task], data: Mapping[str, list[Example]], texts: list[str]) -> tuple[dict, dict]:
    scores, preds, at = {}, {}, 0
    for t in tasks:
        exs = data[t.name]
        preds[t.name] = texts[at:at + len(exs)]
        scores[t.name] = task_score(t.metric, preds[t.name], [e.answer for e in exs])
        at += len(exs)
    return scores, preds


class _Evaluator:
    """The state of one eval run: the suite's examples, the options, the progress sink."""

    def __init__(self, suite: TaskSuite, options: EvalOptions, n_experts: int, progress: Progress | None) -> None:
        self.suite = suite
        self.opts = options
        self.progress = progress
        self.tasks = list(suite.tasks)
        self.test = suite.load(options.split, options.limit)
        self.grids = {m: grid_points(m, options.grid, n_experts) for m in options.methods}
        needs_validation = any(len(points) > 1 for points in self.grids.values())
        self.validation = suite.load("validation", options.validation_limit) if needs_validation else {}

    def run(self, runner: Runner, data: Mapping[str, list[Example]], label: str, mix: torch.Tensor | None = None,
            tasks: Sequence[Task] | None = None) -> tuple[dict[str, float], dict[str, list[str]], Generated]:
        tasks = list(self.tasks if tasks is None else tasks)
        prompts = [e.messages for t in tasks for e in data[t.name]]
        advance = self.progress(label, len(prompts)) if self.progress else None
        out = generate(runner, prompts, mix, max_new_tokens=self.opts.max_new_tokens,
                       batch_size=self.opts.batch_size, on_done=advance)
        scores, preds = _score(tasks, data, out.texts)
        return scores, preds, out

    def search_rank(self, plain: PlainModel, src: Sources, label: str, core: Weights,
                    expert_scores: Mapping[str, Mapping[str, float]],
                    expert_of_task: Mapping[str, str]) -> RankSearch:
        """The exclusive rank the twin on the core `core` (its weights) needs (twinrt.eval.twin_rank)."""
        factored = decoder_linear_weights(plain.config)
        by_name = {t.name: t for t in self.tasks}

        def score(tasks: Sequence[str], label: str) -> dict[str, float]:
            return self.run(plain, self.test, label, tasks=[by_name[t] for t in tasks])[0]

        return search_rank(label, dict(core), src, plain.assign, score, self.opts.twin_ranks, expert_scores,
                           expert_of_task, factored)

    def arm(self, runner: Runner, name: str, kind: str, stored: int, mix: torch.Tensor | None = None,
            params: dict[str, Any] | None = None) -> ArmResult:
        scores, preds, out = self.run(runner, self.test, name, mix)
        return ArmResult(name, kind, scores, preds, out.tokens, out.seconds, stored, params)

    def merge(self, plain: PlainModel, src: Sources, method: str, stored: int,
              stats: Callable[[str], TensorStats] | None = None,
              workdir: Path | None = None) -> tuple[ArmResult, Selection]:
        """The merge arm of `method`, its parameters chosen on validation. Each grid point is merged once (a
        MaTS merge can take longer than every arm's decoding together): the best point so far, unless it is
        the last, is kept in `workdir` (a temporary dir) and loaded back if it is chosen; the chosen merge is
        still loaded in `plain` on return."""
        m = get_method(method)
        points = self.grids[method]
        val_scores: list[dict[str, float]] = []
        kept = None if workdir is None else workdir / f"best-{method}.safetensors"
        for i, params in enumerate(points if len(points) > 1 else ()):
            plain.assign(merge_weights(src, m, params, stats))
            label = f"merge:{method} " + " ".join(f"{k}={v}" for k, v in params.items() if k != "seed")
            val_scores.append(self.run(plain, self.validation, f"{label} (validation)")[0])
            means = Selection(method, points, val_scores, 0).val_means
            if kept is not None and i < len(points) - 1 and best_point(means) == i:
                save_file(plain.weights(), str(kept))
        sel = Selection(method, points, val_scores, 0)
        if val_scores:
            sel = Selection(method, points, val_scores, best_point(sel.val_means))
        if len(points) == 1:
            plain.assign(merge_weights(src, m, points[0], stats))
        elif sel.chosen != len(points) - 1:  # the last point merged is still loaded otherwise
            plain.assign(load_file(str(kept)).items() if kept is not None
                         else merge_weights(src, m, points[sel.chosen], stats))
        if kept is not None:
            kept.unlink(missing_ok=True)
        return self.arm(plain, f"merge:{method}", "merge", stored, params=points[sel.chosen]), sel


_RESULT_OPTIONS_ONLY = ("base", "expert_paths", "check_fingerprints")  # where things are, not what is scored


def _device_name(device: torch.device | str) -> str:
    d = torch.device(device)
    return f"{d.type}:{d.index if d.index is not None else 0}" if d.type != "cpu" else "cpu"


def run_key(tm: TwinModel, suite: TaskSuite, ev: _Evaluator) -> dict[str, Any]:
    """What a resumed run must share with the journal's: the artifact's manifest (its bytes: a re-split, a new
    router or an added expert changes them; a move does not), the options that change a score, the tasks and
    their metrics, and every example the run reads (train too when a data-based merge needs statistics)."""
    opts = {k: v for k, v in options_json(ev.opts).items() if k not in _RESULT_OPTIONS_ONLY}
    splits = {"test": ev.test, "validation": ev.validation}
    if needed_statistics(ev.opts.methods, ev.grids):
        splits["train"] = suite.load("train")
    return {"options": opts, "dtype": str(tm.dtype).removeprefix("torch."), "device": _device_name(tm.device),
            "tasks": {t.name: t.metric for t in ev.tasks},
            "manifest": hashlib.sha256((tm.artifact.path / MANIFEST).read_bytes()).hexdigest(),
            "examples": examples_digest(splits)}


def _arm_of(d: dict[str, Any]) -> ArmResult:
    return ArmResult(**d)


def _search_json(r: RankSearch | None) -> dict[str, Any] | None:
    """A rank search as JSON; an undefined mean (NaN: an expert that scores 0) as null."""
    if r is None:
        return None
    return {"core": r.core, "means": {str(k): None if math.isnan(v) else v for k, v in r.means.items()},
            "target": r.target}


def _search_of(d: dict[str, Any] | None) -> RankSearch | None:
    if d is None:
        return None
    return RankSearch(d["core"], {int(k): math.nan if v is None else v for k, v in d["means"].items()}, d["target"])


def _merge_json(v: tuple[ArmResult, Selection, RankSearch | None]) -> dict[str, Any]:
    return {"arm": asdict(v[0]), "selection": asdict(v[1]), "rank": _search_json(v[2])}


def _merge_of(d: dict[str, Any]) -> tuple[ArmResult, Selection, RankSearch | None]:
    return _arm_of(d["arm"]), Selection(**d["selection"]), _search_of(d["rank"])


def run_eval(tm: TwinModel, suite: TaskSuite, options: EvalOptions = EvalOptions(), *,
             routing: Routing | None = None, progress: Progress | None = None,
             journal: Journal | None = None) -> EvalResult:
    """Evaluate every arm on the suite's test split (see the module docstring); `journal` records each finished
    step and, when it resumes a run, gives back the steps that run finished."""
    art = tm.artifact
    sizes = art.manifest.sizes
    expert_of_task = task_experts(suite.names, tm.experts, options.task_expert)
    ev = _Evaluator(suite, options, len(tm.experts), progress)  # reads every split it needs first
    src = sources_of(art.manifest, base=options.base, experts=options.expert_paths,
                     check_fingerprints=options.check_fingerprints)
    j = journal if journal is not None else Journal()
    j.begin(run_key(tm, suite, ev))
    arms: list[ArmResult] = []
    selections: list[Selection] = []

    plain = PlainModel.load(art.core_dir, tm.device, tm.dtype)

    def expert_arm(e: str) -> ArmResult:
        plain.assign(expert_weights(src, e))
        return ev.arm(plain, f"expert:{e}", "expert", src.stored_bytes(e))

    for e in tm.experts:
        arms.append(j.step(f"expert:{e}", functools.partial(expert_arm, e), asdict, _arm_of))
    searches: list[RankSearch] = []
    expert_scores = {a.name: a.scores for a in arms if a.kind == "expert"}
    with contextlib.ExitStack() as stack:
        statistics, fresh = None, []
        if needed_statistics([m for m in options.methods if not j.done(f"merge:{m}")], ev.grids):
            # a merge left to run needs them: the whole pass of an uninterrupted run (its cost is the table's)
            kinds = needed_statistics(options.methods, ev.grids)
            calibrations = suite_calibration(suite, expert_of_task, tm.experts, plain.tokenizer,
                                             options.calibration_samples, options.batch_size,
                                             getattr(plain.config, "max_position_embeddings", None))
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="twinrt-eval-statistics-")))
            statistics, fresh = eval_statistics(plain, src, calibrations, kinds, work, progress)
            j.forget("statistics")  # computed again: this pass's cost, not the earlier one's
        costs = j.step("statistics", lambda: fresh, lambda cs: [asdict(c) for c in cs],
                       lambda d: [ExpertCost(**c) for c in d])
        if options.twin_ranks:
            def core_search() -> RankSearch:
                core = SafetensorsDir(art.core_dir, what="the artifact's core")
                return ev.search_rank(plain, src, "core", ((n, core.get(n)) for n in core.names()),
                                      expert_scores, expert_of_task)

            searches.append(j.step("rank:core", core_search, _search_json, _search_of))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="twinrt-eval-merges-")))

        def merge_arm(method: str) -> tuple[ArmResult, Selection, RankSearch | None]:
            result, sel = ev.merge(plain, src, method, sizes.core, statistics, work)
            search = None
            if options.twin_ranks:  # from the merge just scored, still loaded: no second merge of it
                search = ev.search_rank(plain, src, f"merge:{method}", plain.weights().items(), expert_scores,
                                        expert_of_task)
            return result, sel, search

        for method in options.methods:
            result, sel, search = j.step(f"merge:{method}", functools.partial(merge_arm, method), _merge_json,
                                         _merge_of)
            arms.append(result)
            selections.append(sel)
            if search is not None:
                searches.append(search)
        statistics = None  # the steps above close over these: dropping them frees the statistics and the model
    plain = None

    twin_bytes = sizes.core + sum(s.factors + s.dense for s in sizes.experts.values())
    labels = [expert_of_task[t.name] for t in ev.tasks for _ in ev.test[t.name]]
    arms.append(j.step("core", lambda: ev.arm(tm, "core", "core", sizes.core), asdict, _arm_of))
    arms.append(j.step("twin:oracle", lambda: ev.arm(tm, "twin:oracle", "twin", twin_bytes,
                                                     one_hot_mixes(labels, tm.experts)), asdict, _arm_of))
    stats = None
    if routing is not None:
        def router_arm() -> tuple[ArmResult, RouterStats]:
            weights, rs = _route(routing, ev, labels, tm.experts)
            return ev.arm(tm, "twin:router", "twin", twin_bytes + routing.stored_bytes, weights), rs

        arm, stats = j.step(f"twin:router {routing.label}", router_arm,
                            lambda v: {"arm": asdict(v[0]), "router": asdict(v[1])},
                            lambda d: (_arm_of(d["arm"]), RouterStats(**d["router"])))
        arms.append(arm)
    return EvalResult(artifact=str(art.path), tasks_dir=str(suite.root), tasks=ev.tasks,
                      expert_of_task=expert_of_task, examples={t: len(v) for t, v in ev.test.items()}, arms=arms,
                      selections=selections, router=stats, options=options, statistics=costs,
                      twin_ranks=searches)


def _route(routing: Routing, ev: _Evaluator, labels: list[str],
           experts: list[str]) -> tuple[torch.Tensor, RouterStats]:
    prompts = [e.messages for t in ev.tasks for e in ev.test[t.name]]
    t0 = time.perf_counter()
    rows = []
    for i in range(0, len(prompts), ev.opts.batch_size):
        w = routing.route(prompts[i:i + ev.opts.batch_size])
        rows.append(torch.as_tensor(w, dtype=torch.float32).detach().cpu())
    seconds = time.perf_counter() - t0
    weights = torch.cat(rows)  # [B, N]
    if tuple(weights.shape) != (len(prompts), len(experts)):
        raise TwinError(f"the router gave weights of shape {list(weights.shape)}, expected "
                        f"[{len(prompts)}, {len(experts)}] (experts {experts})")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise TwinError("the router gave negative or non-finite weights")
    hits = router_hits(weights, labels, experts)
    per_task, at = {}, 0
    for t in ev.tasks:
        n = len(ev.test[t.name])
        per_task[t.name] = sum(hits[at:at + n]) / n
        at += n
    return weights, RouterStats(routing.label, sum(hits) / len(hits), per_task, seconds)
