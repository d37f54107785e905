"""One forward pass for the running rows' next tokens and a long prompt's next chunk together.

A chunk of a long prompt run as a forward pass of its own costs a whole extra pass over the weights, which on
a memory-bound device is about what the decode step of every running row costs. Here both go through the
model at once, every token as a row of its own (`input_ids: [B + n, 1]`): the linear layers (and per-row
expert mixing, one mix per token) see B + n rows, and only attention tells them apart. Attention runs in two
parts per layer: the B decode rows over their left-padded batch cache (`[B, H, L + 1, D]`, its padding mask),
and the n chunk tokens over the long prompt's own cache (`[1, H, done + n, D]`, causal). The caches grow
exactly as in separate passes.

It works through transformers' attention interface: the model's attention implementation is set to
`ATTENTION`, which is the `sdpa` path of transformers for every ordinary forward (the same function, the same
masks) and the two-part attention while `packed_forward` runs. Models whose layers are not all plain full
attention over a `DynamicCache` (sliding windows, other cache layouts) keep separate passes (`supported`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from twinrt.runtime import cache_ops

ATTENTION = "twinrt_sdpa"


@dataclass
class _Pack:
    """The two caches of one packed forward and what each layer's attention needs from them."""

    rows: DynamicCache  # [B, H, L, D] before the pass
    rows_mask: torch.Tensor  # [B, 1, 1, L + 1] bool: the rows' padding mask, the new token included
    chunk: DynamicCache  # [1, H, done, D] before the pass
    chunk_mask: torch.Tensor  # [1, 1, n, done + n] bool: causal over the prompt
    n_rows: int
    kv: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # layer -> rows' K, V, chunk's K, V


_current: ContextVar[_Pack | None] = ContextVar("twinrt_packed", default=None)


class _PackedCache(Cache):
    """What the model's layers see as their cache during a packed pass: appends each token row to its cache."""

    def __init__(self, pack: _Pack) -> None:  # noqa: D107 - no Cache layers of its own
        self.pack = pack
        self.layers = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        p, b = self.pack, self.pack.n_rows
        # key_states: [B + n, H, 1, D]: rows first, then the chunk's tokens, which become one sequence
        kr, vr = p.rows.update(key_states[:b], value_states[:b], layer_idx)
        kc, vc = p.chunk.update(key_states[b:].transpose(0, 2), value_states[b:].transpose(0, 2), layer_idx)
        p.kv[layer_idx] = (kr, vr, kc, vc)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    p = _current.get()
    if p is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kr, vr, kc, vc = p.kv.pop(module.layer_idx)
    if any(kwargs.get(k) is not None for k in ("softcap", "sliding_window", "s_aux")):
        raise NotImplementedError("packed passes do not do attention softcapping, sliding windows or sinks")
    b = p.n_rows
    scale = kwargs.get("scaling")
    gqa = query.shape[1] != kr.shape[1]
    out_rows = F.scaled_dot_product_attention(query[:b], kr, vr, attn_mask=p.rows_mask, scale=scale,
                                              enable_gqa=gqa)  # [B, H, 1, D]
    qc = query[b:].transpose(0, 2)  # [n, H, 1, D] -> [1, H, n, D]
    out_chunk = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=p.chunk_mask, scale=scale, enable_gqa=gqa)
    # [B + n, 1, H, D], the layout attention functions return
    return torch.cat([out_rows.transpose(1, 2), out_chunk.permute(2, 0, 1, 3)]), None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def supported(model: nn.Module, cache: DynamicCache) -> bool:
    """Whether `model` can run packed passes: it uses transformers' attention interface and full attention."""
    impl = getattr(model.config, "_attn_implementation", None)
    return impl in ("sdpa", ATTENTION) and cache_ops.joinable(cache)


def enable(model: nn.Module) -> None:
    """Route the model's attention through `ATTENTION` (the sdpa path of transformers outside packed passes)."""
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


@contextlib.contextmanager
def _packing(pack: _Pack) -> Iterator[None]:
    token = _current.set(pack)
    try:
        yield
    finally:
        _current.reset(token)


def packed_forward(model: nn.Module, rows_next: torch.Tensor, rows_cache: DynamicCache, rows_mask: torch.Tensor,
                   chunk_ids: torch.Tensor, chunk_cache: DynamicCache, chunk_start: int) -> torch.Tensor:
    """One pass: the running rows' next tokens and a chunk of the long prompt.

    rows_next: [B] the token each row feeds; rows_mask: [B, L] the rows' mask before it (left padding);
    chunk_ids: [n] the prompt's tokens at positions chunk_start ...; both caches grow in place.
    -> logits [B + n, V] in the model's dtype: each row's next-token logits, then those after each chunk token
    (the chunk's last one is the long prompt's next-token logits; the others score its prompt).
    """
    b, n = rows_next.shape[0], chunk_ids.shape[0]
    dev = rows_mask.device
    mask = torch.cat([rows_mask, torch.ones(b, 1, dtype=rows_mask.dtype, device=dev)], dim=1)  # [B, L + 1]
    rows_pos = mask.long().sum(-1) - 1  # [B]: the new token's position in its row
    chunk_pos = torch.arange(chunk_start, chunk_start + n, device=dev)
    ids = torch.cat([rows_next, chunk_ids])[:, None]  # [B + n, 1]
    positions = torch.cat([rows_pos, chunk_pos])[:, None]  # [B + n, 1]
    total = chunk_start + n
    causal = torch.ones(n, total, dtype=torch.bool, device=dev).tril(chunk_start)  # [n, done + n]
    pack = _Pack(rows_cache, mask.bool()[:, None, None, :], chunk_cache, causal[None, None], b)
    # a 4-D mask makes transformers skip building one; the two-part attention builds its own
    unused = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)
    with _packing(pack), torch.no_grad():
        out = model(input_ids=ids, attention_mask=unused, position_ids=positions, past_key_values=_PackedCache(pack),
                    use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]  # [B + n, V]
