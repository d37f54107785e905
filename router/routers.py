"""Routers: an encoder (texts -> features [B, D]) plus a head (features -> logits [B, N]).

    z = head(encoder(routing_text(x))) / calibration_temperature      # RoutingResult.logits
    weights, probs, rules = apply_options(z, options)                  # see router.options

Kinds (the `kind` saved in router.json):
    "prototype"  EmbeddingRouter, PrototypeHead (training-free: cosine to per-expert centroids)
    "trained"    EmbeddingRouter, MLPHead trained on labelled examples
    "hidden"     HiddenStateRouter: the Twin-Merging paper's router, MLPHead over the shared core's
                 mean-pooled last hidden state

Inputs with no routing text (empty or whitespace-only strings, chats without user content) are not encoded:
their logits are 0 (probs uniform) and they get the fallback row, whatever the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch
from torch import nn

from router.inputs import RouterInput, routing_texts
from router.options import RoutingOptions, RoutingResult, apply_options

KINDS = ("prototype", "trained", "hidden")


class Encoder(Protocol):
    dim: int
    max_length: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


class Router:
    """A thin holder of encoder, head, calibration temperature and default options."""

    kind: ClassVar[str] = ""

    def __init__(self, experts: Sequence[str], encoder: Encoder, head: nn.Module, *,
                 temperature: float = 1.0, options: RoutingOptions | None = None) -> None:
        n = head.spec()["n"]
        if n != len(experts):
            raise ValueError(f"head has {n} outputs but there are {len(experts)} experts")
        if head.spec()["dim"] != encoder.dim:
            raise ValueError(f"head reads {head.spec()['dim']} features but the encoder gives {encoder.dim}")
        self.experts = list(experts)
        self.encoder = encoder
        self.head = head.eval()
        self.temperature = float(temperature)
        self.options = options or RoutingOptions()

    @torch.inference_mode()
    def logits_of_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated logits [B, N], no_evidence [B] bool) for routing texts."""
        empty = torch.tensor([not t.strip() for t in texts], dtype=torch.bool)
        logits = torch.zeros(len(texts), len(self.experts))
        keep = [i for i, e in enumerate(empty.tolist()) if not e]
        if keep:
            feats = self.encoder.encode([texts[i] for i in keep])    # [B', D]
            logits[keep] = self.head(feats).float() / self.temperature
        return logits, empty

    def route(self, inputs: Sequence[RouterInput], options: RoutingOptions | None = None) -> RoutingResult:
        """Weights [B, N] in `experts` order for a batch of strings and/or chats (their user turns)."""
        logits, empty = self.logits_of_texts(routing_texts(inputs))
        return apply_options(logits, options or self.options, self.experts, no_evidence=empty)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, experts={self.experts}, head={self.head.spec()})"


class EmbeddingRouter(Router):
    """A sentence-transformers encoder (default all-MiniLM-L6-v2) with a prototype or trained head."""

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "prototype" if self.head.spec()["type"] == "prototype" else "trained"


class HiddenStateRouter(Router):
    """The shared core's mean-pooled last hidden state with a trained MLP head (Twin-Merging's router)."""

    kind: ClassVar[str] = "hidden"
