"""Routing (Contract 4): score each input and give per-expert weights [B, N] in the artifact's expert order.

    from router import load_router, RoutingOptions
    r = load_router("ARTIFACT")                                 # ARTIFACT/router/, offline
    res = r.route(["what is 17 * 3?", [{"role": "user", "content": "hi!"}]])
    res.weights     # [2, N], rows ≥ 0 summing to 1 (or all zero: the "core" fallback)
    res.rules       # per row: "router" | "top_k" | "min_weight" | "fallback"
    r.route(batch, RoutingOptions(top_k=1))                     # per-call options

    art = Artifact.open("ARTIFACT")                             # training (what `twinrt router train` does)
    cfg = TrainConfig(kind="hidden")
    out = train_router(art, read_examples("data.jsonl"), cfg)
    save_router(out.router, art, out.training_record(cfg, "data.jsonl", "expert"))

Heavy dependencies (sentence-transformers, transformers models) load only when a router is built.
"""

from router.data import Example, read_examples
from router.encoders import CoreEncoder, SentenceEncoder
from router.inputs import RouterInput, routing_text
from router.options import RoutingOptions, RoutingResult, apply_options
from router.routers import KINDS, EmbeddingRouter, HiddenStateRouter, Router
from router.store import load_router, save_router
from router.train import TrainConfig, TrainOutcome, evaluate_router, train_router

__all__ = [
    "KINDS", "CoreEncoder", "EmbeddingRouter", "Example", "HiddenStateRouter", "Router", "RouterInput",
    "RoutingOptions", "RoutingResult", "SentenceEncoder", "TrainConfig", "TrainOutcome", "apply_options",
    "evaluate_router", "load_router", "read_examples", "routing_text", "save_router", "train_router",
]
