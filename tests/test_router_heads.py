"""Router heads, temperature scaling and the routing metrics, on hand-made tensors with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from router.heads import PROTOTYPE_SCALE, T_MAX, T_MIN, fit_prototypes, fit_temperature, nll, train_mlp
from router.metrics import confusion_matrix, evaluate, expected_calibration_error
from twinrt.errors import TwinError


def _blobs(n_per: int, seed: int, dim: int = 8, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(3, dim) * 3
    y = torch.arange(3).repeat_interleave(n_per)
    return centers[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_prototype_logits_are_scaled_cosines_to_centroids() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    head = fit_prototypes(x, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(head.centroids, torch.eye(2))
    out = head(torch.tensor([[1.0, 1.0], [5.0, 0.0]]))
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(out, PROTOTYPE_SCALE * torch.tensor([[c, c], [1.0, 0.0]]))
    with pytest.raises(TwinError, match="no examples for class 2"):
        fit_prototypes(x, torch.tensor([0, 0, 1, 1]), 3)


@pytest.mark.parametrize("hidden", [0, 16])
def test_mlp_head_learns_separable_blobs_deterministically(hidden) -> None:
    x, y = _blobs(30, seed=0)
    head, loss = train_mlp(x, y, 3, hidden=hidden, epochs=150, seed=1)
    again, loss2 = train_mlp(x, y, 3, hidden=hidden, epochs=150, seed=1)
    assert loss == loss2 and loss < 0.1
    xt, yt = _blobs(20, seed=5)
    assert (head(xt).argmax(-1) == yt).float().mean() == 1.0
    torch.testing.assert_close(head(xt), again(xt))
    assert head.spec() == {"type": "mlp", "dim": 8, "n": 3, "hidden": hidden}
    torch.testing.assert_close(head.mean, x.mean(0))


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at() -> None:
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(4000, 4, generator=g)
    for t_true in (0.5, 2.0):
        y = torch.multinomial(torch.softmax(z / t_true, -1), 1, generator=g).squeeze(1)
        t = fit_temperature(z, y)
        assert abs(t / t_true - 1) < 0.1, (t, t_true)
        assert nll(z, y, t) <= nll(z, y, 1.0)


def test_fit_temperature_stays_finite_on_perfectly_separated_data() -> None:
    z = torch.tensor([[10.0, 0.0], [0.0, 10.0]] * 10)
    y = torch.tensor([0, 1] * 10)
    t = fit_temperature(z, y)
    assert T_MIN < t < T_MAX
    # the fitted confidence matches the pseudo-count 1 / (M + 1) error rate it assumes
    conf = torch.softmax(z / t, -1).max(-1).values[0]
    assert 0.9 < conf < 0.999
    assert fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == 1.0


def test_confusion_accuracy_and_ece_on_hand_values() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1],
                                     [0.05, 0.9, 0.05], [0.4, 0.3, 0.3]]))
    assert confusion_matrix(logits.argmax(-1), labels, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    ev = evaluate(logits, labels)
    assert ev.accuracy == pytest.approx(3 / 5)
    # bins: (0.3,0.4] {0.4 wrong}, (0.5,0.6] {0.6 wrong}, (0.7,0.8] {0.8 right}, (0.8,0.9] {0.9 r, 0.9 r}
    expected = (0.4 + 0.6 + 0.2 + 2 * 0.1) / 5
    assert ev.ece == pytest.approx(expected, abs=1e-6)
    perfect = torch.nn.functional.one_hot(labels, 3).float()
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0)
    assert ev.summary()["confusion"] == ev.confusion
