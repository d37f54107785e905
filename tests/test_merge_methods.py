"""Every merge method equals an independent reimplementation, task_arithmetic / ties / dare_* agree with PEFT's
merge_utils on the same stacked tensors, and each method's declared parameters and constraints hold."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from twinrt.errors import TwinError
from twinrt.merge import METHODS, get_method
from twinrt.merge import methods as M


@pytest.fixture
def tau() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 12, 9, generator=g)  # [N, out, in]


# ---- independent reimplementations, entry by entry in numpy ------------------------------------------------

def ref_trim(t: np.ndarray, density: float) -> np.ndarray:
    out = np.zeros_like(t)
    for i in range(t.shape[0]):
        flat = t[i].ravel()
        k = int(density * flat.size)
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        o = np.zeros_like(flat)
        o[keep] = flat[keep]
        out[i] = o.reshape(t[i].shape)
    return out


def ref_disjoint(t: np.ndarray) -> np.ndarray:
    n = t.shape[0]
    out = np.zeros(t.shape[1:])
    for idx in itertools.product(*map(range, t.shape[1:])):
        vals = [t[(i, *idx)] for i in range(n)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [v for v in vals if v != 0 and np.sign(v) == sign]
        out[idx] = sum(agree) / len(agree) if agree else 0.0
    return out


def ref_consensus(t: np.ndarray, scaling: float, k: int, lam: float) -> np.ndarray:
    total = t.sum(0)
    out = np.zeros(t.shape[1:])
    for idx in itertools.product(*map(range, t.shape[1:])):
        votes = sum(abs(t[(i, *idx)]) >= lam * abs(total[idx] - t[(i, *idx)]) for i in range(t.shape[0]))
        out[idx] = scaling * total[idx] if votes >= k else 0.0
    return out


def ref_pcb(t: np.ndarray, scaling: float, ratio: float, outlier: float) -> np.ndarray:
    """PCB-merging as the paper's algorithm states it, on the whole flattened tensor at once: clip |τ| at the
    reference code's sorted positions, intra-balancing exp(N · minmax(|τ|)²), inter-balancing tanh(τ_i Σ τ_j),
    drop below the (1 − r) quantile of the score, min-max rescale, weighted mean of the clipped τ."""
    n = t.shape[0]
    x = t.reshape(n, -1)
    d = x.shape[1]

    def clip_rows(v, low, high):
        s = np.sort(v, axis=1)
        return np.clip(v, s[:, int(d * low)][:, None], s[:, int(d * (1 - high) - 1)][:, None])

    def minmax_rows(v):
        lo, hi = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
        return (v - lo) / (hi - lo)

    mag = clip_rows(np.abs(x), outlier, outlier)
    score = np.exp(n * minmax_rows(mag) ** 2) * np.tanh(x * x.sum(axis=0))
    weight = minmax_rows(clip_rows(score, 1 - ratio, 0))
    merged = scaling * (weight * np.sign(x) * mag).sum(axis=0) / np.maximum(weight.sum(axis=0), 1e-12)
    return merged.reshape(t.shape[1:])


def test_average(tau):
    assert torch.allclose(M.average(tau), torch.from_numpy(tau.numpy().sum(0) / 4), atol=1e-6)


def test_task_arithmetic_matches_reference_and_peft(tau):
    ours = M.task_arithmetic(tau, scaling=0.3)
    assert torch.allclose(ours, torch.from_numpy(0.3 * tau.numpy().sum(0)), atol=1e-6)
    peft = merge_utils.task_arithmetic(list(tau), torch.full((4,), 0.3))
    assert torch.allclose(ours, peft, atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference_and_peft(tau, density):
    ours = M.ties(tau, scaling=0.7, density=density)
    ref = 0.7 * ref_disjoint(ref_trim(tau.numpy().astype(np.float64), density))
    assert torch.allclose(ours, torch.from_numpy(ref).float(), atol=1e-6)
    peft = merge_utils.ties(list(tau), torch.full((4,), 0.7), density)
    assert torch.allclose(ours, peft, atol=1e-6)


def _peft_with_masks(fn, tau, keep, monkeypatch, **kw):
    # PEFT draws DARE's masks from the global RNG; hand it ours, in the same order it prunes the experts
    masks = iter(keep)
    monkeypatch.setattr(merge_utils, "random_pruning",
                        lambda t, density, rescale: t * next(masks) / density if rescale else t * next(masks))
    return fn(list(tau), **kw)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_matches_reference_and_peft(tau, name, monkeypatch):
    keep = M.dare_keep_masks(tau.shape[1:], 4, 0.4, torch.Generator().manual_seed(3))
    assert 0.25 < keep.float().mean() < 0.55
    ours = METHODS[name].merge(tau, {"scaling": 0.5, "density": 0.4, "seed": 0}, keep)
    dropped = tau.numpy().astype(np.float64) * keep.numpy() / 0.4
    ref = 0.5 * (dropped.sum(0) if name == "dare_linear" else ref_disjoint(dropped))
    assert torch.allclose(ours, torch.from_numpy(ref).float(), atol=1e-5)
    peft = _peft_with_masks(getattr(merge_utils, name), tau, keep, monkeypatch,
                            weights=torch.full((4,), 0.5), density=0.4)
    assert torch.allclose(ours, peft, atol=1e-6)


def test_dare_masks_are_seeded():
    a = M.dare_keep_masks(torch.Size([50]), 3, 0.5, torch.Generator().manual_seed(1))
    b = M.dare_keep_masks(torch.Size([50]), 3, 0.5, torch.Generator().manual_seed(1))
    c = M.dare_keep_masks(torch.Size([50]), 3, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_matches_reference(tau, k):
    ours = M.consensus(tau, scaling=0.3, k=k, tall_lambda=0.4)
    ref = ref_consensus(tau.numpy().astype(np.float64), 0.3, k, 0.4)
    assert torch.allclose(ours, torch.from_numpy(ref).float(), atol=1e-6)


def test_consensus_removes_selfish_weights():
    # entry 0: only expert 0 moves it (selfish) -> dropped at k=2; entry 1: all agree -> kept
    tau = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert torch.equal(M.consensus(tau, scaling=1.0, k=2, tall_lambda=0.4), torch.tensor([0.0, 3.0]))


@pytest.mark.parametrize("ratio,outlier,shape", [(0.1, 0.0001, (4, 12, 9)), (0.3, 0.05, (4, 12, 9)),
                                                  (1.0, 0.0, (3, 40, 25)), (0.05, 0.01, (2, 30, 20))])
def test_pcb_matches_reference(ratio, outlier, shape):
    t = 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(11))
    params = get_method("pcb").resolve({"scaling": 0.8, "density": ratio, "outlier": outlier})
    ours = get_method("pcb").merge(t, params)
    ref = ref_pcb(t.numpy().astype(np.float64), 0.8, ratio, outlier)
    assert torch.allclose(ours, torch.from_numpy(ref).float(), atol=1e-6, rtol=1e-5)


def test_pcb_drops_the_low_scores_and_keeps_a_zero_tensor_zero(tau):
    m = get_method("pcb")
    params = m.resolve({"density": 0.2})
    stats = M.pcb_statistics(tau.reshape(4, -1), density=0.2, outlier=params["outlier"])
    weight = M.min_max(M.pcb_scores(tau.reshape(4, -1), stats["lo"], stats["hi"]).clamp(stats["floor"], stats["top"]),
                       stats["floor"], stats["top"])
    kept = (weight > 0).float().mean(dim=1)  # every expert keeps about density of its entries, not more
    assert torch.all(kept <= 0.2) and torch.all(kept >= 0.15), kept
    zero = torch.zeros(3, 5, 4)
    assert torch.equal(m.merge(zero, params), torch.zeros(5, 4))  # no NaN from a constant row


def test_registry_resolves_defaults_and_refuses_unknowns():
    assert get_method("ties").resolve({}) == {"scaling": 1.0, "density": 0.2}
    assert get_method("dare_ties").resolve({"density": 0.3}) == {"scaling": 1.0, "density": 0.3, "seed": 0}
    with pytest.raises(TwinError, match="unknown shared.method 'tiez'"):
        get_method("tiez")
    with pytest.raises(TwinError, match="does not take density"):
        get_method("task_arithmetic").resolve({"density": 0.5})
    with pytest.raises(TwinError, match="in \\(0, 1\\]"):
        get_method("ties").resolve({"density": 1.5})


@pytest.mark.parametrize("given,message", [
    ({"k": 0}, "shared.k must be an integer >= 1, got 0"),
    ({"k": 2.0}, "shared.k must be an integer >= 1, got 2.0"),
    ({"base": "average"}, "shared.base must be 'task_arithmetic' or 'ties', got 'average'"),
    ({"scaling": -1}, "shared.scaling must be a positive number, got -1"),
    ({"density": True}, "shared.density must be a number in (0, 1], got True"),
])
def test_parameter_models_refuse_bad_values_naming_them(given, message):
    with pytest.raises(TwinError) as e:
        get_method("consensus").resolve(given)
    assert str(e.value) == message
    with pytest.raises(TwinError, match="shared.seed must be a non-negative integer, got -1"):
        get_method("dare_linear").resolve({"seed": -1})
    with pytest.raises(TwinError, match=r"shared.outlier must be a number in \[0, 0.5\), got 0.5"):
        get_method("pcb").resolve({"outlier": 0.5})
    assert get_method("pcb").resolve({}) == {"scaling": 1.0, "density": 0.1, "outlier": 0.0001}


def test_methods_declare_their_trim_and_expert_needs():
    trims = {name: m.params.model_validate(m.resolve({})).trim_density() for name, m in METHODS.items()}
    assert trims == {"average": None, "task_arithmetic": None, "ties": 0.2, "dare_linear": None, "dare_ties": None,
                     "consensus": None, "pcb": None, "fisher": None, "regmean": None, "mats": None}
    consensus = get_method("consensus")
    ties_based = consensus.resolve({"base": "ties", "density": 0.4})
    assert consensus.params.model_validate(ties_based).trim_density() == 0.4
    assert consensus.min_experts(consensus.resolve({"k": 3})) == 3
    assert all(m.min_experts(m.resolve({})) == 1 for name, m in METHODS.items() if name != "consensus")
    consensus.check(consensus.resolve({"k": 3}), 3)
    with pytest.raises(TwinError, match=r"shared.k=3 needs at least that many experts \(have 2\)"):
        consensus.check(consensus.resolve({"k": 3}), 2)
    for m in METHODS.values():
        m.check(m.resolve({}), 2)


@pytest.mark.parametrize("name,given", [
    ("average", {}), ("task_arithmetic", {}), ("ties", {"density": 0.3}), ("dare_linear", {}),
    ("dare_ties", {"density": 0.4}), ("consensus", {"k": 2}), ("consensus", {"base": "ties", "density": 0.5}),
    ("pcb", {"density": 0.3}),
])
def test_chunked_merge_equals_whole_tensor_merge(tau, name, given):
    # the split merges large tensors a slice of columns at a time (bounded memory); trim thresholds come
    # from the whole tensor, so every chunk size must give the same core, bit for bit
    m = get_method(name)
    params = m.resolve(given)
    keep = (M.dare_keep_masks(tau.shape[1:], 4, params["density"], torch.Generator().manual_seed(5)) if m.random
            else None)
    whole = m.merge(tau, params, keep)
    kw = {k: v for k, v in params.items() if k != "seed"}
    if m.random:
        kw["keep"] = keep.reshape(4, -1)
    kw.update(m.prepare(tau.reshape(4, -1), m.params.model_validate(params)))
    assert torch.equal(whole, m.fn(tau.reshape(4, -1), **kw).reshape(whole.shape))
    for chunk in (1, 7, 50, 107):
        assert torch.equal(m.merge(tau, params, keep, chunk=chunk), whole), chunk


def test_trim_keeps_nothing_at_density_that_rounds_to_zero(tau):
    assert torch.equal(M.magnitude_trim(tau, 0.001), torch.zeros_like(tau))
    assert torch.equal(get_method("ties").merge(tau, {"scaling": 1.0, "density": 0.001}, chunk=10),
                       torch.zeros(tau.shape[1:]))
