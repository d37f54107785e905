"""How well a router picks experts: top-1 accuracy, confusion matrix, calibration (ECE) and NLL.

All take the router's calibrated logits [M, N] (routing options ignored: they do not change the argmax) and
true labels [M] as expert indices.

    ECE = Σ_bins |bin| / M · |accuracy(bin) − mean confidence(bin)|,  confidence = max softmax probability,
          10 equal-width bins over (0, 1]: bin b holds (b/10, (b+1)/10]

A confidence within `BIN_EDGE_TOL` above an edge counts as on it: a float32 softmax gives 0.7 as 0.7000001, which
belongs in (0.6, 0.7], not (0.7, 0.8].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ECE_BINS = 10
BIN_EDGE_TOL = 1e-5


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows with pred == label. pred, labels: [M]."""
    return float((pred == labels).float().mean()) if len(labels) else float("nan")


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """counts[true, predicted]. pred, labels: [M] in [0, n) -> [n, n] int64."""
    return torch.bincount(labels * n + pred, minlength=n * n).reshape(n, n)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE of the max probability (see the module docstring). probs: [M, N], labels: [M]."""
    if len(labels) == 0:
        return float("nan")
    conf, pred = probs.max(dim=-1)                                      # [M], [M]
    correct = (pred == labels).float()
    scaled = (conf.double() - BIN_EDGE_TOL) * bins
    idx = (scaled.ceil().long() - 1).clamp(0, bins - 1)                # bin b holds (b/bins, (b+1)/bins]
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += float(sel.float().mean()) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return total


@dataclass(frozen=True)
class Evaluation:
    n: int
    accuracy: float
    confusion: list[list[int]]     # [true][predicted]
    ece: float
    nll: float

    @property
    def per_expert(self) -> list[float]:
        """Accuracy on each true expert's examples (the confusion matrix's row recall; NaN for no examples)."""
        return [row[i] / sum(row) if sum(row) else float("nan") for i, row in enumerate(self.confusion)]

    def summary(self) -> dict:
        return {"examples": self.n, "accuracy": round(self.accuracy, 6), "ece": round(self.ece, 6),
                "nll": round(self.nll, 6), "confusion": self.confusion}


def evaluate(logits: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    """All metrics at once. logits: [M, N] calibrated, labels: [M]."""
    logits = logits.float()
    n = logits.shape[-1]
    pred = logits.argmax(dim=-1)
    nll = float(F.cross_entropy(logits, labels)) if len(labels) else float("nan")
    return Evaluation(n=len(labels), accuracy=accuracy(pred, labels),
                      confusion=confusion_matrix(pred, labels, n).tolist(),
                      ece=expected_calibration_error(torch.softmax(logits, dim=-1), labels), nll=nll)
