"""Calibration statistics of one tensor, stacked over the N experts, as the data-based merge methods take them.

    fisher    [N, *shape]      diagonal Fisher of every entry: the mean over calibration examples of the
                               squared gradient of the example's log-likelihood (empirical Fisher)
    gram_in   [N, in, in]      a linear weight's input Gram, Σ_t x_t x_tᵀ / T over the expert's T tokens
    gram_out  [N, out, out]    its output-gradient Gram, Σ_t g_t g_tᵀ / E over the tokens of E examples,
                               g_t = ∂ log-likelihood / ∂ y_t (with gram_in: the K-FAC blocks of the Fisher)

A field is None where that statistic was not collected for this tensor (no Gram for a norm weight, say);
what a method then does is part of its definition. A method names the fields it needs in its parameter
model (`MethodParams.statistics()`), so whoever collects statistics asks the method, never its name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

FISHER = "fisher"
GRAM_IN = "gram_in"
GRAM_OUT = "gram_out"
KINDS = (FISHER, GRAM_IN, GRAM_OUT)  # every statistic a method may ask for, in collection order


@dataclass(frozen=True)
class TensorStats:
    """One tensor's statistics for each expert, in mix order (see the module docstring)."""

    fisher: torch.Tensor | None = None  # [N, *shape]
    gram_in: torch.Tensor | None = None  # [N, in, in]
    gram_out: torch.Tensor | None = None  # [N, out, out]

    def columns(self, start: int, stop: int) -> TensorStats:
        """The statistics of columns start:stop of the flattened tensor: elementwise ones are sliced
        (`fisher` -> [N, stop − start]), per-matrix ones (the Grams) are kept whole."""
        fisher = None if self.fisher is None else self.fisher.reshape(self.fisher.shape[0], -1)[:, start:stop]
        return TensorStats(fisher, self.gram_in, self.gram_out)

    def to(self, device: torch.device | str) -> TensorStats:
        return TensorStats(*(None if t is None else t.to(device) for t in (self.fisher, self.gram_in, self.gram_out)))

    def present(self) -> frozenset[str]:
        """The names of the fields that hold a tensor."""
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)
