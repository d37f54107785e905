"""Router heads (features [B, D] -> logits [B, N]), how they are fitted, and temperature scaling.

- `PrototypeHead` (training-free): logits = scale · cos(x, c_n), with c_n the normalised mean of expert n's
  example features. Cosines lie in [-1, 1]; `PROTOTYPE_SCALE` = 20 maps a cosine gap of 0.1 between two
  experts to a logit gap of 2 (probability ratio e² ≈ 7.4), the same role as CLIP's logit scale.
- `MLPHead`: standardise x with the training features' mean and std, then Linear(D, N) when hidden = 0,
  else Linear(D, H) → GELU → Linear(H, N). Trained full-batch with AdamW on cross-entropy.

`fit_temperature` is temperature scaling (Guo et al. 2017): the T > 0 minimising the held-out NLL of
softmax(logits / T) (with a small pseudo-count, see there), searched on log T within [T_MIN, T_MAX]. It never
changes a prediction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from twinrt.errors import TwinError

PROTOTYPE_SCALE = 20.0
T_MIN, T_MAX = 0.05, 20.0


class PrototypeHead(nn.Module):
    """logits[b, n] = scale · cos(x[b], centroids[n]). centroids: [N, D]."""

    def __init__(self, centroids: torch.Tensor, scale: float = PROTOTYPE_SCALE) -> None:
        super().__init__()
        self.register_buffer("centroids", F.normalize(centroids.float(), dim=-1))
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, D] -> [B, N]
        return self.scale * F.normalize(x, dim=-1) @ self.centroids.T

    def spec(self) -> dict:
        n, d = self.centroids.shape
        return {"type": "prototype", "dim": d, "n": n, "scale": self.scale}


class MLPHead(nn.Module):
    """Standardise, then a linear layer (hidden = 0) or a one-hidden-layer GELU MLP."""

    def __init__(self, dim: int, n: int, hidden: int = 0, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.float().clone())
        self.register_buffer("std", torch.ones(dim) if std is None else std.float().clone())
        self.hidden = hidden
        if hidden:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n))
        else:
            self.net = nn.Sequential(nn.Linear(dim, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, D] -> [B, N]
        return self.net((x - self.mean) / self.std)

    def spec(self) -> dict:
        first, last = self.net[0], self.net[-1]
        return {"type": "mlp", "dim": first.in_features, "n": last.out_features, "hidden": self.hidden}


def head_from_spec(spec: dict) -> nn.Module:
    """An empty head of the shape `spec` describes (its state is loaded afterwards)."""
    if spec["type"] == "prototype":
        return PrototypeHead(torch.zeros(spec["n"], spec["dim"]), spec["scale"])
    return MLPHead(spec["dim"], spec["n"], spec["hidden"])


def class_means(features: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """Mean feature of each class. features: [M, D], labels: [M] in [0, n) -> [n, D]."""
    counts = torch.bincount(labels, minlength=n)
    if (counts == 0).any():
        raise TwinError(f"no examples for class {int((counts == 0).nonzero()[0])}")
    sums = torch.zeros(n, features.shape[1]).index_add_(0, labels, features.float())
    return sums / counts[:, None]


def fit_prototypes(features: torch.Tensor, labels: torch.Tensor, n: int,
                   scale: float = PROTOTYPE_SCALE) -> PrototypeHead:
    """Centroids of the L2-normalised features of each expert. features: [M, D], labels: [M]."""
    return PrototypeHead(class_means(F.normalize(features.float(), dim=-1), labels, n), scale)


def train_mlp(features: torch.Tensor, labels: torch.Tensor, n: int, hidden: int = 64, epochs: int = 300,
              lr: float = 1e-2, weight_decay: float = 1e-2, seed: int = 0) -> tuple[MLPHead, float]:
    """Fit an MLPHead full-batch; returns it (in eval mode) and the final training loss."""
    x = features.float().clone()                                  # [M, D]; a normal tensor, even from inference mode
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = MLPHead(x.shape[1], n, hidden, mean, std)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        opt.zero_grad()
        loss = F.cross_entropy(head(x), labels)
        loss.backward()
        opt.step()
    return head.eval(), float(loss.detach())


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, smoothing: float = 0.0) -> float:
    """Mean NLL of softmax(logits / T) against labels smoothed by `smoothing`. logits: [M, N], labels: [M]."""
    return float(F.cross_entropy(logits.float() / temperature, labels, label_smoothing=smoothing))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iters: int = 60) -> float:
    """argmin over T in [T_MIN, T_MAX] of nll(logits, labels, T, ε): golden-section search on log T.

    ε = 1 / (M + 1) for M held-out rows, a Laplace-style pseudo-count: M examples cannot show an error rate
    below about 1 / (M + 1), so perfectly separated held-out data give a finite T instead of T → 0 (which
    would make every routing decision one-hot and the fallback threshold useless). As M grows, ε → 0 and
    this is plain temperature scaling. The objective is convex in 1/T, hence unimodal in log T.
    """
    m = logits.shape[0]
    if m == 0:
        return 1.0
    eps = 1.0 / (m + 1)

    def f(log_t: float) -> float:
        return nll(logits, labels, math.exp(log_t), eps)

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return math.exp((lo + hi) / 2)
