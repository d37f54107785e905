"""The per-row decode-time constraint the engine applies (structured output: JSON schemas, regexes, choices).

For a row with a constraint, every step of the engine does

    if constraint.finished(): the row ends ("stop"), no token is taken
    allowed = constraint.allowed()              # [V'] bool or None (any token)
    logits[~fit(allowed, V)] = -inf            # after logit_bias and min_tokens, before penalties and sampling
    t = pick(logits)                            # greedy or sampled, as without a constraint
    constraint.advance(t)                       # t joins the output (not for EOS / stop_token_ids: they end it)
    if constraint.finished(): the row ends ("stop")

A constraint that raises fails its row alone (an internal RowFailure); so does one that leaves no token allowed.
If it allows only end-of-sequence, taking it ends the row as EOS always does.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TokenConstraint(Protocol):
    """What may come next in one row. Token ids are the model's: `allowed()` may be shorter than the model's
    logits width V (a tokenizer's vocabulary, padded in the model's head): ids past its end are not allowed."""

    def allowed(self) -> torch.Tensor | None:
        """[V'] bool: the tokens allowed next (None: any)."""
        ...

    def advance(self, token: int) -> None:
        """The row took `token` (raises ValueError if it was not allowed)."""
        ...

    def finished(self) -> bool:
        """Nothing more may follow: the row ends ("stop")."""
        ...


def fit(allowed: torch.Tensor, width: int) -> torch.Tensor:
    """allowed: [V'] bool -> [width] bool on the CPU: cut past `width`, padded with False up to it."""
    allowed = allowed.detach().to("cpu", torch.bool).reshape(-1)
    if allowed.shape[0] >= width:
        return allowed[:width]
    return torch.cat([allowed, allowed.new_zeros(width - allowed.shape[0])])
