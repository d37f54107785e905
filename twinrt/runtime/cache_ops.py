"""Batch surgery on a transformers DynamicCache, so requests can join and leave a running batch.

Rows are left-padded: every row's tokens end at the last column. Joining pads the shorter cache on the left;
leaving selects rows and drops columns that are padding in every remaining row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


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
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)


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
