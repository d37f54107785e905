"""Batch surgery on a transformers DynamicCache, so requests can join and leave a running batch.

Rows are left-padded: every row's tokens end at the last column. Joining pads the shorter cache on the left;
leaving selects rows and drops columns that are padding in every remaining row. `snapshot`/`restore` undo a
forward that failed half-way (it appended to some layers), and `select_copy` runs a forward on some rows
without touching the batch's cache. `reserved` is the cache of one long prompt prefilled in chunks: each chunk
is written into room reserved for the whole prompt, where a DynamicCache would copy the whole prefix again.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from twinrt.runtime.transfer import to_device


def joinable(cache: DynamicCache) -> bool:
    """Only plain full-attention layers can be padded and concatenated (sliding windows keep extra state)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def left_pad(cache: DynamicCache, n: int) -> None:
    if n <= 0:
        return
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, n, 0))  # [B, H, L, D] -> [B, H, n + L, D]
        layer.values = F.pad(layer.values, (0, 0, n, 0))


def concat(dst: DynamicCache, src: DynamicCache) -> None:
    """Append src's rows to dst's (both already the same length)."""
    for a, b in zip(dst.layers, src.layers):
        a.keys = torch.cat([a.keys, b.keys], dim=0)
        a.values = torch.cat([a.values, b.values], dim=0)


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep `rows` ([R] long, on the host or the cache's device) of every layer."""
    if cache.layers:
        rows = to_device(rows, cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)


def select_copy(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A new cache holding `rows` of `cache` (same length and layer types); `cache` is left as it is."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    select_rows(out, rows)
    return out


Snapshot = list[tuple[object, dict]]


def snapshot(cache: DynamicCache) -> Snapshot:
    """What a forward may change: the layer list and each layer's attributes. DynamicCache layers grow by
    concatenation (`keys = cat([keys, new])`), never in place, so holding the old tensors is enough."""
    return [(layer, dict(vars(layer))) for layer in cache.layers]


def restore(cache: DynamicCache, snap: Snapshot) -> None:
    """Put `cache` back as it was at `snapshot` (layers appended to since are cut back, new layers dropped)."""
    cache.layers = [layer for layer, _ in snap]
    for layer, state in snap:
        vars(layer).clear()
        vars(layer).update(state)


def drop_left(cache: DynamicCache, n: int) -> None:
    if n <= 0:
        return
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, n:, :]
        layer.values = layer.values[:, :, n:, :]


def join(cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor
         ) -> tuple[DynamicCache, torch.Tensor]:
    """Merge two left-padded batches (caches and [B, L] attention masks) into one."""
    la, lb = mask.shape[1], new_mask.shape[1]
    left_pad(cache, lb - la)
    left_pad(new_cache, la - lb)
    mask = F.pad(mask, (max(lb - la, 0), 0))
    new_mask = F.pad(new_mask, (max(la - lb, 0), 0))
    concat(cache, new_cache)
    return cache, torch.cat([mask, new_mask], dim=0)


def keep_rows(cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep only `rows`; trim leading columns that are now padding everywhere. Returns the new mask."""
    select_rows(cache, rows)
    mask = mask.index_select(0, rows)
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    drop_left(cache, first)
    return mask[:, first:]


class ReservedLayer(DynamicLayer):
    """A DynamicLayer with room reserved for `capacity` tokens: an update is written into it (`keys` and
    `values` are views of its first tokens), so a prompt prefilled in k chunks copies each token once, not
    the whole prefix k times. Beyond `capacity` it grows by concatenation, as a DynamicLayer does."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if end > self.capacity or (self._room is not None and self._room[0].shape[0] != key_states.shape[0]):
            return super().update(key_states, value_states, *args, **kwargs)
        if self._room is None:
            b, h, _, d = key_states.shape
            self._room = (key_states.new_empty(b, h, self.capacity, d), value_states.new_empty(b, h, self.capacity, d))
        k, v = self._room
        k[:, :, start:end] = key_states
        v[:, :, start:end] = value_states
        self.keys, self.values = k[:, :, :end], v[:, :, :end]
        return self.keys, self.values


def reserved(config, capacity: int) -> DynamicCache:
    """A cache for one sequence of at most `capacity` tokens (a DynamicCache for models whose layers are not
    all plain full attention). `released` turns it into a plain DynamicCache with the same contents."""
    cache = DynamicCache(config=config)
    if joinable(cache):
        cache.layers = [ReservedLayer(capacity) for _ in cache.layers]
    return cache


def released(cache: DynamicCache) -> DynamicCache:
    """The same cache with plain DynamicLayers (holding the same tensors), to join a batch."""
    layers = []
    for layer in cache.layers:
        if type(layer) is ReservedLayer:
            plain = DynamicLayer()
            if layer.is_initialized:
                plain.lazy_initialization(layer.keys, layer.values)
                plain.keys, plain.values = layer.keys, layer.values
            layer = plain
        layers.append(layer)
    cache.layers = layers
    return cache
