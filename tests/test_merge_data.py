"""The data-based merge methods on random data: RegMean is the closed-form least-squares merge, MaTS' conjugate
gradient reaches RegMean's closed form where both apply and solves the K-FAC system where only it does,
Fisher merging weights the experts by their Fishers; each declares the statistics it needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinrt.errors import TwinError
from twinrt.merge import METHODS, TensorStats, get_method
from twinrt.merge.datamethods import conjugate_gradient

N, OUT, IN = 3, 5, 4


@pytest.fixture
def layer():
    """Random inputs X_i (a different number of tokens per expert), weights W_i and a base weight."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(t, IN, generator=g, dtype=torch.float64) for t in (40, 25, 60)]
    base = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    ws = [base + 0.3 * torch.randn(OUT, IN, generator=g, dtype=torch.float64) for _ in range(N)]
    grams = torch.stack([x.T @ x / x.shape[0] for x in xs]).float()  # [N, in, in]: per-token Grams
    tau = torch.stack([w - base for w in ws]).float()  # [N, out, in]
    return xs, base, ws, grams, tau


def output_grams(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(N, OUT, 2 * OUT, generator=g)
    return m @ m.transpose(1, 2) / (2 * OUT)  # [N, out, out], positive definite


def kfac_solution(tau: torch.Tensor, g_in: torch.Tensor, g_out: torch.Tensor) -> np.ndarray:
    """Σ_i B_i W G_i = Σ_i B_i W_i G_i solved directly: vec(B W G) = (Gᵀ ⊗ B) vec(W), column-major vec."""
    a = sum(np.kron(g.numpy().astype(np.float64).T, b.numpy().astype(np.float64)) for g, b in zip(g_in, g_out))
    rhs = sum(b.numpy().astype(np.float64) @ t.numpy().astype(np.float64) @ g.numpy().astype(np.float64)
              for t, g, b in zip(tau, g_in, g_out))
    return np.linalg.solve(a, rhs.reshape(-1, order="F")).reshape(OUT, IN, order="F")


def test_regmean_is_the_least_squares_merge(layer):
    xs, base, ws, grams, tau = layer
    # min_W Σ_i ‖X_i W_iᵀ − X_i Wᵀ‖² / T_i, by lstsq on the stacked, 1/√T_i-weighted rows
    x_all = torch.cat([x / x.shape[0] ** 0.5 for x in xs])
    y_all = torch.cat([x @ w.T / x.shape[0] ** 0.5 for x, w in zip(xs, ws)])
    w_star = torch.linalg.lstsq(x_all, y_all).solution.T  # [out, in]
    params = get_method("regmean").resolve({"alpha": 1.0})
    merged = get_method("regmean").merge(tau, params, stats=TensorStats(gram_in=grams))
    assert torch.allclose(merged.double(), w_star - base, atol=1e-5)
    assert not torch.allclose(merged, tau.mean(dim=0), atol=1e-3)  # not the plain average


def test_regmean_alpha_scales_the_off_diagonal(layer):
    *_, grams, tau = layer
    # alpha 0: only the diagonal of each Gram is left, so every input column is a weighted mean of the experts'
    diag = torch.diagonal(grams, dim1=1, dim2=2)  # [N, in]
    expected = (tau * diag[:, None, :]).sum(0) / diag.sum(0)
    merged = get_method("regmean").merge(tau, {"alpha": 0.0}, stats=TensorStats(gram_in=grams))
    assert torch.allclose(merged, expected, atol=1e-6)
    half = get_method("regmean").merge(tau, {"alpha": 0.5}, stats=TensorStats(gram_in=grams))
    g = 0.5 * grams.double() + 0.5 * torch.diag_embed(diag.double())
    closed = torch.einsum("noi,nij->oj", tau.double(), g) @ torch.linalg.inv(g.sum(0))
    assert torch.allclose(half.double(), closed, atol=1e-6)


def test_regmean_averages_tensors_without_grams(layer):
    *_, tau = layer
    assert torch.allclose(get_method("regmean").merge(tau, {"alpha": 0.9}, stats=TensorStats()), tau.mean(0))


@pytest.mark.parametrize("objective", ["regmean", "kfac"])
def test_mats_reaches_regmean_closed_form(layer, objective):
    # where both apply: the RegMean system, and K-FAC with identity output-gradient Grams (the same system)
    *_, grams, tau = layer
    closed = get_method("regmean").merge(tau, {"alpha": 0.7}, stats=TensorStats(gram_in=grams))
    stats = TensorStats(gram_in=grams, gram_out=torch.eye(OUT).expand(N, OUT, OUT).clone())
    m = get_method("mats")
    out = m.apply(tau, m.resolve({"objective": objective, "alpha": 0.7, "tolerance": 1e-10}), stats=stats)
    assert torch.allclose(out.tau, closed, atol=1e-5, rtol=1e-5)
    assert 0 < out.report["iterations"] <= 100 and out.report["residual"] <= 1e-10


def test_mats_solves_the_kfac_system(layer):
    *_, grams, tau = layer
    g_out = output_grams()
    m = get_method("mats")
    out = m.apply(tau, m.resolve({"objective": "kfac", "tolerance": 1e-8}), stats=TensorStats(gram_in=grams,
                                                                                               gram_out=g_out))
    assert torch.allclose(out.tau.double(), torch.from_numpy(kfac_solution(tau, grams, g_out)), atol=1e-5)
    # the stated residual, recomputed here: ‖Σ B_i W G_i − Σ B_i W_i G_i‖ / ‖Σ B_i W_i G_i‖
    lhs = sum(b.double() @ out.tau.double() @ g.double() for g, b in zip(grams, g_out))
    rhs = sum(b.double() @ t.double() @ g.double() for t, g, b in zip(tau, grams, g_out))
    residual = float((lhs - rhs).norm() / rhs.norm())
    assert residual <= 1e-6 and out.report["residual"] == pytest.approx(residual, abs=1e-7)
    # and it is not RegMean's solution: the output-gradient Grams weigh the experts differently per output
    regmean = get_method("regmean").merge(tau, {"alpha": 1.0}, stats=TensorStats(gram_in=grams))
    assert not torch.allclose(out.tau, regmean, atol=1e-3)


def test_mats_starts_from_task_arithmetic_and_keeps_it_without_a_system(layer):
    *_, grams, tau = layer
    m = get_method("mats")
    out = m.apply(tau, m.resolve({"scaling": 0.4}), stats=TensorStats(gram_in=grams))  # kfac lacks gram_out
    assert torch.allclose(out.tau, 0.4 * tau.sum(0)) and out.report == {}
    one_step = m.apply(tau, m.resolve({"objective": "regmean", "iterations": 1}), stats=TensorStats(gram_in=grams))
    assert one_step.report["iterations"] == 1 and one_step.report["residual"] > 1e-3


def test_conjugate_gradient_on_a_matrix_system():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.1 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, 1, generator=g, dtype=torch.float64)
    x, steps, residual = conjugate_gradient(lambda v: a @ v, b, torch.zeros_like(b), iterations=50, tolerance=1e-12)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-9) and steps <= 50 and residual <= 1e-12


def test_fisher_weights_the_experts_by_their_fishers(layer):
    *_, tau = layer
    m = get_method("fisher")
    params = m.resolve({})
    same = torch.rand(N, OUT, IN, generator=torch.Generator().manual_seed(4))[0].expand(N, OUT, IN)
    assert torch.allclose(m.merge(tau, params, stats=TensorStats(fisher=same.clone())), tau.mean(0), atol=1e-6)
    dominant = torch.full((N, OUT, IN), 1e-4)
    dominant[1] = 1e4
    assert torch.allclose(m.merge(tau, params, stats=TensorStats(fisher=dominant)), tau[1], atol=1e-6)
    mixed = torch.rand(N, OUT, IN, generator=torch.Generator().manual_seed(5))  # per entry, independently
    expected = ((mixed + 1e-6) * tau).sum(0) / (mixed + 1e-6).sum(0)
    assert torch.allclose(m.merge(tau, params, stats=TensorStats(fisher=mixed), chunk=7), expected, atol=1e-6)
    assert torch.allclose(m.merge(tau, params, stats=TensorStats(fisher=torch.zeros(N, OUT, IN))), tau.mean(0))
    assert torch.allclose(m.merge(tau, params, stats=TensorStats()), tau.mean(0))  # not a parameter: averaged


def test_methods_declare_the_statistics_they_need(layer):
    needs = {name: m.statistics(m.resolve({})) for name, m in METHODS.items()}
    assert needs == {"average": set(), "task_arithmetic": set(), "ties": set(), "dare_linear": set(),
                     "dare_ties": set(), "consensus": set(), "pcb": set(), "fisher": {"fisher"},
                     "regmean": {"gram_in"}, "mats": {"gram_in", "gram_out"}}
    mats = get_method("mats")
    assert mats.statistics(mats.resolve({"objective": "regmean"})) == {"gram_in"}
    *_, tau = layer
    with pytest.raises(ValueError, match="regmean needs calibration statistics"):
        get_method("regmean").merge(tau, get_method("regmean").resolve({}))


@pytest.mark.parametrize("method,given,message", [
    ("regmean", {"alpha": 1.5}, "shared.alpha must be a number in [0, 1], got 1.5"),
    ("mats", {"objective": "ties"}, "shared.objective must be 'kfac' or 'regmean', got 'ties'"),
    ("mats", {"iterations": 0}, "shared.iterations must be an integer >= 1, got 0"),
    ("mats", {"tolerance": -1}, "shared.tolerance must be a number >= 0, got -1"),
    ("fisher", {"floor": 0}, "shared.floor must be a positive number, got 0"),
])
def test_data_method_parameters_are_validated(method, given, message):
    with pytest.raises(TwinError) as e:
        get_method(method).resolve(given)
    assert str(e.value) == message
