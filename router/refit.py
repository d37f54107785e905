"""Refitting an artifact's router when its expert set changes (`twinrt add --router-data`, `twinrt remove`).

    built = refit_router(art, new_experts, data)    # a router dir for new_experts, beside the artifact

The router keeps its training examples' encoded features (router/features.safetensors), so a refit needs no
retraining from the texts: the rows of removed experts are dropped, `data` (labelled examples, at least one
batch for every expert the stored rows do not cover, e.g. the new one) is encoded with the router's own
encoder and appended, and the head is fitted again with the router's recorded training settings (kind, MLP
width, epochs, hold-out share and seed; prototypes are the class means again). Encoding the new examples is
the only encoder work.

A prototype router without stored features (trained with --no-features) still refits exactly where it can:
each kept expert keeps its centroid, each expert in `data` gets the centroid of its examples, and the
calibration temperature stays. A trained or hidden router without them cannot, and says so.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from router.data import Example, label_indices
from router.heads import PROTOTYPE_SCALE, PrototypeHead, fit_prototypes
from router.metrics import Evaluation
from router.routers import EmbeddingRouter
from router.store import load_features, load_router, read_config, write_router_dir
from router.train import TrainConfig, fit_router, routing_texts
from twinrt.artifact import Artifact
from twinrt.errors import TwinError


@dataclass(frozen=True)
class Refit:
    path: Path                        # the built router dir (moved into the artifact by the update)
    experts: list[str]
    examples: int                     # rows the head was fitted on (stored + new)
    new_examples: int
    evaluation: Evaluation | None     # held-out metrics of the refitted router (None: no hold-out)


def training_config(cfg) -> TrainConfig:
    """The TrainConfig a saved router (RouterConfig `cfg`) was trained with, as far as router.json records it."""
    t = cfg.training
    return TrainConfig(kind=cfg.kind, holdout=t.get("holdout_fraction", 0.2), seed=t.get("seed", 0),
                       hidden=cfg.head.hidden if cfg.head.type == "mlp" else None,
                       epochs=max(1, int(t.get("epochs") or 300)), lr=t.get("lr", 1e-2),
                       weight_decay=t.get("weight_decay", 1e-2), prototype_scale=cfg.head.scale or PROTOTYPE_SCALE,
                       max_length=cfg.encoder.max_length, options=cfg.options)


def refit_router(art: Artifact, experts: Sequence[str], data: Sequence[Example] = (), *,
                 source: str = "the router data", where: Path | None = None) -> Refit:
    """A router for the expert set `experts` (mix order) refitted from `art`'s router (see the module
    docstring), written to a new dir in `where` (default: beside the artifact, so it can be moved in)."""
    experts = list(experts)
    cfg = read_config(art.router_dir)
    router = load_router(art)
    new_labels = torch.tensor(label_indices(data, experts, source), dtype=torch.long)
    new_feats = router.encoder.encode(routing_texts(data, source)) if data else torch.zeros(0, cfg.encoder.dim)
    stored = load_features(art.router_dir, cfg)
    index = {e: i for i, e in enumerate(experts)}
    if stored is None:
        if cfg.kind != "prototype":
            raise TwinError(f"the {cfg.kind} router of {art.path} keeps no training features (trained with "
                            "--no-features or by an older twinrt), so it cannot be refitted: pass --drop-router "
                            "and train it again")
        return _refit_prototypes(art, router, cfg, experts, new_feats, new_labels, where)
    feats, labels = stored
    names = [cfg.experts[i] for i in labels.tolist()]
    keep = [i for i, n in enumerate(names) if n in index]
    feats = torch.cat([feats[keep], new_feats.float()])
    labels = torch.cat([torch.tensor([index[names[i]] for i in keep], dtype=torch.long), new_labels])
    missing = [e for i, e in enumerate(experts) if not (labels == i).any()]
    if missing:
        raise TwinError(f"{source} has no examples of {', '.join(map(repr, missing))}: the refitted router needs "
                        "labelled examples of every new expert")
    tc = training_config(cfg)
    out = fit_router(experts, router.encoder, feats, labels, tc)
    training = {**cfg.training, **out.training_record(tc, cfg.training.get("data", "?"),
                                                      cfg.training.get("label_key", "expert")),
                "refits": [*cfg.training.get("refits", []), {"experts": experts, "new_examples": len(data)}]}
    built = _build_dir(art, where)
    try:
        write_router_dir(out.router, built, training, (out.features, out.labels))
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return Refit(built, experts, len(labels), len(data), out.evaluation)


def _refit_prototypes(art: Artifact, router, cfg, experts: list[str], feats: torch.Tensor, labels: torch.Tensor,
                      where: Path | None) -> Refit:
    old = router.head.centroids  # [N_old, D], normalised
    have = set(labels.tolist())
    fresh = fit_prototypes(feats, labels, len(experts), router.head.scale).centroids if have == \
        set(range(len(experts))) else None
    rows = []
    for i, e in enumerate(experts):
        if i in have:
            mask = labels == i
            rows.append(fresh[i] if fresh is not None else
                        fit_prototypes(feats[mask], torch.zeros(int(mask.sum()), dtype=torch.long), 1).centroids[0])
        elif e in cfg.experts:
            rows.append(old[cfg.experts.index(e)])
        else:
            raise TwinError(f"the router data has no examples of {e!r}: a prototype router needs some for every "
                            "new expert")
    head = PrototypeHead(torch.stack(rows), router.head.scale)
    refitted = EmbeddingRouter(experts, router.encoder, head, temperature=router.temperature, options=router.options)
    training = {**cfg.training, "refits": [*cfg.training.get("refits", []),
                                          {"experts": experts, "new_examples": len(labels)}]}
    built = _build_dir(art, where)
    try:
        write_router_dir(refitted, built, training)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return Refit(built, experts, len(labels), len(labels), None)


def _build_dir(art: Artifact, where: Path | None) -> Path:
    where = Path(where) if where is not None else art.path.parent
    return Path(tempfile.mkdtemp(prefix=f".{art.path.name}.router-refit-", dir=where))


# ---- the hooks `twinrt add` and `twinrt remove` call (registered by router.cli) ----------------------------------

def refitter(artifact: str | Path, *, adding: bool, data_file: str | Path | None = None, label_key: str = "expert",
             drop_router: bool = False, report: Callable[[Refit], None] | None = None,
             flags: tuple[str, str] = ("--router-data", "--drop-router")
             ) -> Callable[[Artifact, list[str]], Path] | None:
    """The callable an `add` (`adding`) or `remove` passes as `router=`: it builds the refitted router for the new
    expert set (from `data_file`'s examples and the stored features), or None where there is nothing to refit
    (no router, `drop_router`, or an add without data, which the update then refuses with its own message).
    `report(refit)` runs after each refit; `flags` name the data and drop options in the messages."""
    has_router = (Path(artifact) / "router").is_dir()
    if data_file and (drop_router or not has_router):
        raise TwinError(f"{flags[0]} and {flags[1]} exclude each other" if has_router else
                        f"{flags[0]}: {artifact} has no router to refit (train one with `twinrt router train`)")
    if drop_router or not has_router or (adding and not data_file):
        return None
    from router.cli import _read

    examples = _read(str(data_file), label_key) if data_file else ()

    def build(art: Artifact, experts: list[str]) -> Path:
        try:
            refit = refit_router(art, experts, examples, source=str(data_file or "the stored router features"))
        except TwinError as e:
            if "--drop-router" in str(e):
                raise TwinError(str(e).replace("--drop-router", flags[1])) from None
            raise TwinError(f"refitting the router: {e}; or pass {flags[1]} (and train one again)") from None
        if report is not None:
            report(refit)
        return refit.path

    return build


def cli_refitter(args: argparse.Namespace) -> Callable[[Artifact, list[str]], Path] | None:
    """For `twinrt add`/`remove` (see `refitter`), printing each refit's held-out accuracy and confusion matrix."""
    from router.cli import console, print_evaluation

    def report(refit: Refit) -> None:
        if not getattr(args, "quiet", False):
            console.print(f"router refitted for {len(refit.experts)} experts on {refit.examples} examples "
                          f"({refit.new_examples} new)")
            if refit.evaluation is not None:
                print_evaluation(refit.evaluation, list(refit.experts), "held out, after the refit")

    return refitter(args.artifact, adding=args.command == "add", data_file=getattr(args, "router_data", None),
                    label_key=getattr(args, "router_label_key", "expert"),
                    drop_router=getattr(args, "drop_router", False), report=report)
