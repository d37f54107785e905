"""Training a router from labelled examples: split, encode once, fit the head, calibrate, measure.

    train, held = stratified_split(labels, holdout, seed)      # per expert, ≥ 1 held out
    f = encoder(texts)                                           # [M, D], computed once
    head = fit_prototypes(f[train]) | train_mlp(f[train])
    T = fit_temperature(head(f[held]), labels[held])             # 1.0 without a hold-out
    evaluation = evaluate(head(f[held]) / T, labels[held])

The held-out split serves both calibration and the reported metrics: accuracy is unaffected (T never
changes an argmax) but the reported ECE is optimistic; `twinrt router eval` on separate data measures it
honestly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from router.data import Example, label_indices, stratified_split
from router.encoders import DEFAULT_CORE_MAX_LENGTH, CoreEncoder, SentenceEncoder
from router.heads import PROTOTYPE_SCALE, fit_prototypes, fit_temperature, nll, train_mlp
from router.inputs import routing_text
from router.metrics import Evaluation, evaluate
from router.options import RoutingOptions
from router.routers import EmbeddingRouter, Encoder, HiddenStateRouter, Router
from twinrt.artifact import Artifact
from twinrt.errors import TwinError
from twinrt.models import minilm_dir
from twinrt.validation import Frozen

DEFAULT_HIDDEN = {"prototype": 0, "trained": 0, "hidden": 64}


class TrainConfig(Frozen):
    """Everything `train_router` needs besides the data; validated once."""

    kind: Literal["prototype", "trained", "hidden"] = "trained"
    holdout: float = Field(0.2, ge=0, le=0.5)
    seed: int = 0
    hidden: int | None = Field(None, ge=0)       # MLP width; 0 = linear; None = DEFAULT_HIDDEN[kind]
    epochs: int = Field(300, ge=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    prototype_scale: float = Field(PROTOTYPE_SCALE, gt=0)
    encoder: str | None = None                   # a sentence-transformers dir; None = all-MiniLM-L6-v2
    max_length: int | None = Field(None, gt=0)   # encoder token limit; None = the encoder's own
    options: RoutingOptions = RoutingOptions()
    device: str = "cpu"


@dataclass(frozen=True)
class TrainOutcome:
    router: Router
    train_size: int
    holdout_size: int
    final_loss: float | None          # None for the training-free prototype head
    nll_uncalibrated: float           # held-out NLL at T = 1 (NaN without a hold-out)
    evaluation: Evaluation | None     # held-out metrics at the calibrated T; None without a hold-out
    features: torch.Tensor | None = None  # [M, D] every example's encoded features (train and held out)
    labels: torch.Tensor | None = None    # [M] their experts, as indices into router.experts

    def training_record(self, cfg: TrainConfig, data: str, label_key: str) -> dict:
        """What router.json keeps under "training"."""
        rec = {"data": data, "label_key": label_key, "examples": self.train_size + self.holdout_size,
               "train": self.train_size, "holdout": self.holdout_size, "holdout_fraction": cfg.holdout,
               "seed": cfg.seed, "epochs": cfg.epochs if cfg.kind != "prototype" else 0,
               "lr": cfg.lr, "weight_decay": cfg.weight_decay, "final_loss": self.final_loss}
        if self.evaluation is not None:
            rec["heldout"] = self.evaluation.summary() | {"nll_uncalibrated": round(self.nll_uncalibrated, 6)}
        return rec


def routing_texts(examples: Sequence[Example], source: str = "the data") -> list[str]:
    """Each example's routing text; a text that is not valid Unicode (a lone UTF-16 surrogate such as JSON's
    "\\ud800", which no tokenizer can encode) is an error naming `source` and the line."""
    texts = []
    for ex in examples:
        text = routing_text(ex.input)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TwinError(f"{source}:{ex.line}: the text has an unpaired UTF-16 surrogate "
                            f"({text[e.start]!r} at character {e.start}), which is not valid Unicode") from None
        texts.append(text)
    return texts


def make_encoder(art: Artifact, cfg: TrainConfig) -> Encoder:
    """The encoder a kind uses: the artifact's core for "hidden", else a sentence-transformers model."""
    if cfg.kind == "hidden":
        return CoreEncoder.from_dir(art.core_dir, device=cfg.device,
                                    max_length=cfg.max_length or DEFAULT_CORE_MAX_LENGTH)
    return SentenceEncoder(Path(cfg.encoder) if cfg.encoder else minilm_dir(), device=cfg.device,
                           max_length=cfg.max_length)


def train_router(art: Artifact, examples: Sequence[Example], cfg: TrainConfig, *,
                 encoder: Encoder | None = None, source: str = "the data") -> TrainOutcome:
    """Fit a router of `cfg.kind` for the artifact's experts (see the module docstring).

    `encoder` reuses an already-built encoder (it must match the kind: a CoreEncoder for "hidden").
    """
    experts = art.experts
    labels = torch.tensor(label_indices(examples, experts, source))
    texts = routing_texts(examples, source)
    stratified_split(labels.tolist(), experts, cfg.holdout, cfg.seed)  # too few examples: say so before loading
    encoder = encoder or make_encoder(art, cfg)
    if (cfg.kind == "hidden") != isinstance(encoder, CoreEncoder):
        raise ValueError(f"a {cfg.kind!r} router needs {'a' if cfg.kind == 'hidden' else 'no'} CoreEncoder")
    return fit_router(experts, encoder, encoder.encode(texts), labels, cfg)


def fit_router(experts: Sequence[str], encoder: Encoder, feats: torch.Tensor, labels: torch.Tensor,
               cfg: TrainConfig) -> TrainOutcome:
    """The router of `cfg.kind` fitted on encoded examples: feats [M, D] (from `encoder`), labels [M] indices
    into `experts`; held out per expert by `cfg.holdout` for calibration and metrics."""
    experts = list(experts)
    train, held = stratified_split(labels.tolist(), experts, cfg.holdout, cfg.seed)
    tr, ho = torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long)

    final_loss = None
    if cfg.kind == "prototype":
        head = fit_prototypes(feats[tr], labels[tr], len(experts), cfg.prototype_scale)
    else:
        hidden = DEFAULT_HIDDEN[cfg.kind] if cfg.hidden is None else cfg.hidden
        head, final_loss = train_mlp(feats[tr], labels[tr], len(experts), hidden=hidden, epochs=cfg.epochs,
                                     lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)

    temperature, evaluation, nll_raw = 1.0, None, float("nan")
    if len(held):
        with torch.no_grad():
            raw = head(feats[ho])                                           # [H, N]
        temperature = fit_temperature(raw, labels[ho])
        nll_raw = nll(raw, labels[ho])
        evaluation = evaluate(raw / temperature, labels[ho])
    cls = HiddenStateRouter if cfg.kind == "hidden" else EmbeddingRouter
    router = cls(experts, encoder, head, temperature=temperature, options=cfg.options)
    return TrainOutcome(router, len(train), len(held), final_loss, nll_raw, evaluation, feats.float(), labels)


def evaluate_router(router: Router, examples: Sequence[Example], source: str = "the data") -> Evaluation:
    """Metrics of a (saved) router on labelled examples."""
    labels = torch.tensor(label_indices(examples, router.experts, source))
    logits, _ = router.logits_of_texts(routing_texts(examples, source))
    return evaluate(logits, labels)
