"""The merge of one named tensor, the one computation the split's core and eval's static merges share.

    merged = method.apply(τ [N, ...], params, keep, stats)   keep: DARE masks drawn from tensor_seed(seed, name)
                                                             stats: the tensor's calibration statistics, for
                                                             the methods that need data

Per-tensor seeds make random merges independent of the order tensors are processed in, so a static merge
with the split's method and parameters reproduces the artifact's core tensor for tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from twinrt.merge.methods import dare_keep_masks
from twinrt.merge.registry import Merged, MergeMethod
from twinrt.merge.stats import TensorStats


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for tensor `name`, derived from `seed`: the same for a name wherever it is processed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def merge_tensor(method: MergeMethod, params: Mapping[str, Any], name: str, tau: torch.Tensor,
                 stats: TensorStats | None = None) -> Merged:
    """The merged task vector of tensor `name`: `tau: [N, ...]` (τ_i = θ_i − θ_base, float32) -> [...], and the
    method's report on it. `stats`: the tensor's statistics (TensorStats() if it has none), where
    `method.statistics(params)` is not empty."""
    keep = None
    if method.random:
        gen = torch.Generator().manual_seed(tensor_seed(params["seed"], name))
        keep = dare_keep_masks(tau.shape[1:], tau.shape[0], params["density"], gen).to(tau.device)  # [N, ...]
    return method.apply(tau, params, keep, stats=stats)
