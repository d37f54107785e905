"""The interface between the engine and a model: what `Engine` needs from what it drives, and nothing more.

Two models implement it: `TwinModel` (the core with every expert's factors, mixed per row) and
`twinrt.eval.generation.PlainModel` (one set of HF weights, no experts). Per forward the engine does

    runner.set_mix(mix, tokens=..., allow_materialize=..., step_tokens=ids.numel())   # mix: [B, N] or None
    try:
        logits = runner.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                              past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    finally:
        runner.clear_mix()
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn


class Runner(Protocol):
    """A model the engine can drive: an HF causal LM plus the mix its next forward passes use.

    Implementations subclass it, so a missing method is an error at construction, not at the first step.
    """

    model: nn.Module  # an HF causal LM taking input_ids, attention_mask, position_ids, past_key_values
    tokenizer: Any  # a transformers tokenizer: encodes prompts, decodes outputs, names pad and eos ids
    config: Any  # the HF config of `model`: context length, attention shape, the KV cache's layout
    device: torch.device  # where `model` runs; the engine moves each forward's inputs there
    experts: Sequence[str]  # the experts, first columns of every mix; empty for a model without experts
    columns: Sequence[str]  # every column of a mix: the experts, then any static merges ("static:<label>")

    @abstractmethod
    def set_mix(self, mix: torch.Tensor | None, tokens: int = 1, allow_materialize: bool = True,
                step_tokens: int | None = None) -> object:
        """Make the next forward pass(es) of `model` use `mix` ([B, C] over `columns`, validated; None = no
        expert). `tokens`: what the batch will process in all; `step_tokens`: this forward's tokens."""
        ...

    @abstractmethod
    def clear_mix(self) -> None:
        """Forget the mix: later forward passes run without experts until the next `set_mix`."""
        ...
