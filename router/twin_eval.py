"""`twinrt eval` with the artifact's trained router as its twin:router arm (twinrt.eval never imports router)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from twinrt.eval.cli import register

if TYPE_CHECKING:
    from twinrt.artifact import Artifact
    from twinrt.eval.run import Routing
    from twinrt.runtime.model import TwinModel


def load_routing(art: Artifact, tm: TwinModel, device: str) -> Routing:
    """ARTIFACT/router/ over the eval's model (a hidden-state router shares its weights) as the eval's Routing."""
    from router.store import load_router
    from twinrt.eval.run import Routing

    router = load_router(art, model=tm.model, tokenizer=tm.tokenizer, device=device)
    return Routing(router.kind, lambda prompts: router.route([list(p) for p in prompts]).weights,
                   art.manifest.sizes.router)


def register_eval(subparsers) -> argparse.ArgumentParser:
    """Add `eval` to twinrt's subparsers; it sets `fn(args) -> exit code`."""
    return register(subparsers, load_routing)
