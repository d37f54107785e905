"""The W' cache: for a mix every row of a batch shares, W' = W + Σ_n w_n (B_n A_n + D_n) per mixing layer.

    cache = MaterializedWeights(mix_linears, dtype, device, budget_bytes)
    key = cache.build(row)         # row: [N]; builds every layer's W' (or reuses it), least recently used out
    state.set(mix, key)            # the mixing layers then run F.linear(x, W') for that mix
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from twinrt.runtime.mixing import MixLinear

MixKey = tuple[float, ...]


def mix_key(row: torch.Tensor) -> MixKey:
    """The cache key of a mix row [N]: its weights rounded to 7 decimals."""
    return tuple(round(float(v), 7) for v in row)


class MaterializedWeights:
    """Every mixing layer's W' for the shared mixes seen last, within a memory budget (LRU order).

    The W' tensors live in each layer's `materialized` dict; this holds their keys and sizes and evicts.
    """

    def __init__(self, layers: Sequence[MixLinear], dtype: torch.dtype, device: torch.device,
                 budget_bytes: int) -> None:
        self.layers = layers
        self.dtype = dtype
        self.device = device
        self.budget_bytes = budget_bytes
        self._sizes: OrderedDict[MixKey, int] = OrderedDict()  # mix key -> bytes of its W', LRU order

    def clear(self) -> None:
        """Drop every W' (the memory is free once no forward holds one)."""
        for layer in self.layers:
            layer.materialized.clear()
        self._sizes.clear()

    def cached(self, row: torch.Tensor) -> bool:
        """Whether the W' of this mix row [N] is built."""
        return mix_key(row) in self._sizes

    def build(self, row: torch.Tensor) -> MixKey:
        """Build and cache W' for every mixing layer (or mark it used) -> its key; evict the least recently used
        beyond the budget (the newest is kept even if it alone exceeds it)."""
        key = mix_key(row)
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return key
        nbytes = 0
        with torch.no_grad():
            for layer in self.layers:
                w = (layer.base.weight.float() + layer.delta_weight(row)).to(self.dtype)
                layer.materialized[key] = w
                nbytes += w.numel() * w.element_size()
        self._sizes[key] = nbytes
        while sum(self._sizes.values()) > self.budget_bytes and len(self._sizes) > 1:
            old, _ = self._sizes.popitem(last=False)
            for layer in self.layers:
                layer.materialized.pop(old, None)
        return key
