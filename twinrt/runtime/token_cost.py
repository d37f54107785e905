"""The engine's cost rule: what running n prompt tokens after p cached ones costs, in token-equivalents.

A token at context 0 costs 1; each key it attends to adds `a` (`attention_share`). `Engine` spends a per-step
budget in these units (`prefill_cost`) and sizes a long prompt's chunks to it (`chunk_tokens`).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def attention_share(model: nn.Module, config: Any) -> float:
    """a = attention FLOPs per (query token, key) pair / linear-layer FLOPs per token, for `prefill_cost`.

    Per (query, key) and layer: QKᵀ and the weighted sum of V, 2·heads·head_dim each. Per token: 2·in·out for
    every nn.Linear except the output head (prefill keeps the logits of the last token only).
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    per_key = 4 * heads * head_dim * int(text.num_hidden_layers)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(m) for m in out.modules()} if out is not None else set()
    linear = sum(2 * m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, nn.Linear) and id(m) not in head)
    return per_key / max(linear, 1)


def prefill_cost(start: int, n: int, attn: float) -> float:
    """Token-equivalents of running n tokens after `start` cached ones (a token at context 0 costs 1):

        Σ_{i < n} (1 + attn · (start + i + 1)) = n + attn · (n · start + n (n + 1) / 2)
    """
    return n + attn * (n * start + n * (n + 1) / 2)


def chunk_tokens(start: int, left: int, budget: float, attn: float) -> int:
    """The largest n in [1, left] with prefill_cost(start, n, attn) <= budget (1 when even one token is over)."""
    a, b = attn / 2, 1 + attn * (start + 0.5)
    n = int(budget / b) if a == 0 else int((-b + math.sqrt(b * b + 4 * a * max(budget, 0.0))) / (2 * a))
    n = max(1, min(left, n))
    while n > 1 and prefill_cost(start, n, attn) > budget:
        n -= 1
    return n
