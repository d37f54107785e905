"""The exclusive rank a twin needs on a given core: the smallest rank of a ladder at which the twin with oracle
routing reaches `target` (0.99) of the experts' score (its mean normalized score, as the A/B table's).

    twin_e(r) = core + truncated_svd_r(θ_e − core)   on the factored weights (every decoder linear layer)
              = θ_e                                  elsewhere (the split stores those deltas exactly)

which is what a split with that core and `exclusive.rank: r` serves for `mix = one-hot(e)`. Ranks are tried in
ascending order, each on the whole test split (every task with its own expert's twin), and the search stops
at the first that reaches the target: a better core, whose exclusive deltas are smaller, stops earlier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from twinrt.eval.metrics import normalized_scores
from twinrt.eval.weights import Sources, expert_weights
from twinrt.merge import tensor_seed
from twinrt.split.svd import truncated_svd

TARGET = 0.99


@dataclass(frozen=True)
class RankSearch:
    """The twin on one core: its mean normalized score at each rank tried (ascending), and the rank needed."""

    core: str  # the arm whose weights are the core: "core" (the artifact's) or "merge:<method>"
    means: dict[int, float]
    target: float = TARGET

    @property
    def rank(self) -> int | None:
        """The smallest rank tried whose mean normalized score reaches the target; None if none did."""
        return next((r for r, m in self.means.items() if m >= self.target), None)


def twin_weights(core: Mapping[str, torch.Tensor], src: Sources, expert: str, rank: int,
                 factored: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, twin_expert(rank)) for every tensor (see the module docstring), with the split's SVD seeds."""
    for name, theta in expert_weights(src, expert):
        base = core[name]
        if name in factored:
            f = truncated_svd(theta.float() - base.float(), rank=rank, seed=tensor_seed(0, expert + name))
            yield name, base.float() + f.b @ f.a
        else:
            yield name, theta


# scores the test examples of `tasks` with the plain model's current weights: (tasks, label) -> {task: score}
ScoreTasks = Callable[[Sequence[str], str], dict[str, float]]


def search_rank(label: str, core: Mapping[str, torch.Tensor], src: Sources, assign: Callable, score: ScoreTasks,
                ranks: Sequence[int], expert_scores: Mapping[str, Mapping[str, float]],
                expert_of_task: Mapping[str, str], factored: set[str], target: float = TARGET) -> RankSearch:
    """Try `ranks` in ascending order on core `core` until the twin reaches `target` (see the module docstring).

    `assign(weights)` loads weights into the model that `score` runs; `expert_scores[f"expert:{e}"]` are the
    experts' own test scores, the denominators."""
    own = {t: f"expert:{e}" for t, e in expert_of_task.items()}
    means: dict[int, float] = {}
    for r in sorted(set(ranks)):
        row: dict[str, float] = {}
        for e in dict.fromkeys(expert_of_task.values()):
            tasks = [t for t, x in expert_of_task.items() if x == e]
            assign(twin_weights(core, src, e, r, factored))
            row.update(score(tasks, f"twin on {label}, rank {r}: {e}"))
        means[r] = normalized_scores({**expert_scores, "twin": row}, own).mean["twin"]
        if means[r] >= target:
            break
    return RankSearch(label, means, target)
