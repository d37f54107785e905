"""Saving and loading a router under ARTIFACT/router/ (Contract 4): JSON config + safetensors, no pickles.

    router/router.json         RouterConfig: format, kind, experts (mix order), options, encoder, head,
                               calibration temperature, training metrics
    router/weights.safetensors the head's tensors ("centroids", or "mean", "std", "net.*")
    router/features.safetensors the training examples' encoded features ("features" [M, D] float32, "labels" [M]
                               int64 indices into experts), not their text: what refits the head when an
                               expert is added or removed (router/refit.py); absent when trained without
    router/encoder/            only for a custom sentence-transformers encoder: a copy of it

The encoder is stored by identity, never by absolute path: "minilm" means `twinrt.models.minilm_dir()`,
"core" means the artifact's core/, any other ref is a path relative to router/. Loading is offline and
refuses a router whose expert order differs from the artifact's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file

from router.encoders import CoreEncoder, SentenceEncoder
from router.heads import head_from_spec
from router.options import RoutingOptions
from router.routers import EmbeddingRouter, HiddenStateRouter, Router
from twinrt.artifact import Artifact
from twinrt.errors import TwinError
from twinrt.models import minilm_dir
from twinrt.validation import Frozen, describe

ROUTER_FORMAT = "twinrt-router/1"
CONFIG_FILE = "router.json"
WEIGHTS_FILE = "weights.safetensors"
FEATURES_FILE = "features.safetensors"
ENCODER_COPY = "encoder"
MINILM = "minilm"


class EncoderSpec(Frozen):
    type: Literal["sentence-transformers", "core"]
    ref: str                  # "minilm" | "core" | a path relative to router/
    dim: int = Field(gt=0)
    max_length: int = Field(gt=0)


class HeadSpec(Frozen):
    type: Literal["prototype", "mlp"]
    dim: int = Field(gt=0)
    n: int = Field(gt=0)
    hidden: int = Field(0, ge=0)
    scale: float | None = None


class RouterConfig(Frozen):
    format: Literal["twinrt-router/1"] = ROUTER_FORMAT
    kind: Literal["prototype", "trained", "hidden"]
    experts: list[str]
    options: RoutingOptions
    encoder: EncoderSpec
    head: HeadSpec
    temperature: float = Field(gt=0)          # calibration: logits are divided by it
    training: dict[str, Any] = {}             # data, split sizes, seed, held-out metrics

    @model_validator(mode="after")
    def _consistent(self) -> RouterConfig:
        want = {"prototype": ("sentence-transformers", "prototype"), "trained": ("sentence-transformers", "mlp"),
                "hidden": ("core", "mlp")}[self.kind]
        if (self.encoder.type, self.head.type) != want:
            raise ValueError(f"kind {self.kind!r} needs encoder {want[0]!r} and head {want[1]!r}")
        return self


def resolve_sentence_encoder(ref: str, router_dir: Path | None) -> Path:
    """The directory an encoder ref names: "minilm" or a relative path under router/."""
    if ref == MINILM:
        return minilm_dir()
    rel = Path(ref)
    inside = router_dir is not None and not rel.is_absolute() and ".." not in rel.parts
    if inside:  # and no symlink on the way leads out of router/
        inside = router_dir.resolve() in (router_dir / rel).resolve().parents
    if not inside:
        raise TwinError(f"router encoder ref {ref!r} must be 'minilm' or a path inside the router directory")
    return router_dir / rel


def config_of(router: Router, encoder_ref: str, training: dict[str, Any] | None = None) -> RouterConfig:
    enc = router.encoder
    return RouterConfig(kind=router.kind, experts=router.experts, options=router.options,
                        encoder=EncoderSpec(type="core" if isinstance(enc, CoreEncoder) else "sentence-transformers",
                                            ref=encoder_ref, dim=enc.dim, max_length=enc.max_length),
                        head=HeadSpec(**router.head.spec()), temperature=router.temperature,
                        training=training or {})


def write_router_dir(router: Router, out: Path, training: dict[str, Any] | None = None,
                     features: tuple[torch.Tensor, torch.Tensor] | None = None) -> RouterConfig:
    """Write router.json + weights.safetensors (+ a copy of a custom encoder, + `features`: the training
    examples' (features [M, D], labels [M])) into the dir `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc = router.encoder
    if isinstance(enc, CoreEncoder):
        ref = "core"
    elif isinstance(enc, SentenceEncoder) and enc.path.resolve() == minilm_dir().resolve():
        ref = MINILM
    elif isinstance(enc, SentenceEncoder):
        shutil.copytree(enc.path, out / ENCODER_COPY)
        ref = ENCODER_COPY
    else:
        raise TypeError(f"cannot save a router whose encoder is a {type(enc).__name__}")
    cfg = config_of(router, ref, training)
    state = {k: v.detach().float().contiguous() for k, v in router.head.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": ROUTER_FORMAT})
    if features is not None:
        feats, labels = features
        if feats.ndim != 2 or feats.shape[1] != enc.dim or labels.shape != (feats.shape[0],):
            raise ValueError(f"features {tuple(feats.shape)} / labels {tuple(labels.shape)} do not fit a "
                             f"{enc.dim}-wide encoder")
        save_file({"features": feats.detach().float().contiguous(), "labels": labels.long().contiguous()},
                  str(out / FEATURES_FILE), metadata={"format": ROUTER_FORMAT})
    (out / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    return cfg


def save_router(router: Router, artifact: Artifact, training: dict[str, Any] | None = None,
                features: tuple[torch.Tensor, torch.Tensor] | None = None) -> RouterConfig:
    """Install the router as ARTIFACT/router/, atomically (a build dir beside it, then a rename); `features`:
    its training examples' (features, labels), kept for refits."""
    if router.experts != artifact.experts:
        raise TwinError(f"router experts {router.experts} differ from the artifact's {artifact.experts}")
    build = Path(tempfile.mkdtemp(prefix=".router.build-", dir=artifact.path))
    try:
        cfg = write_router_dir(router, build, training, features)
        artifact.install_part("router", build)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return cfg


def read_config(router_dir: Path) -> RouterConfig:
    f = router_dir / CONFIG_FILE
    if not f.is_file():
        raise TwinError(f"no router in {router_dir.parent}: {CONFIG_FILE} is missing (run `twinrt router train`)")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TwinError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != ROUTER_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else None
        raise TwinError(f"{f}: router format {got!r} is not supported (this twinrt reads {ROUTER_FORMAT})")
    try:
        return RouterConfig.model_validate(raw)
    except ValidationError as e:
        raise TwinError(f"{f} is malformed at {describe(e, first=True)}") from None


def load_features(router_dir: Path, cfg: RouterConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The training (features [M, D], labels [M]) kept beside the router, None if it kept none; TwinError if
    they do not fit its encoder and experts."""
    f = router_dir / FEATURES_FILE
    if not f.is_file():
        return None
    t = load_file(str(f))
    feats, labels = t.get("features"), t.get("labels")
    if feats is None or labels is None or feats.ndim != 2 or feats.shape[1] != cfg.encoder.dim \
            or labels.shape != (feats.shape[0],) or (len(labels) and not 0 <= int(labels.min())
                                                     <= int(labels.max()) < len(cfg.experts)):
        raise TwinError(f"{f} does not fit the router in {CONFIG_FILE} (features [M, {cfg.encoder.dim}] and "
                        f"labels [M] in [0, {len(cfg.experts)}) expected)")
    return feats.float(), labels.long()


def _load_head(cfg: RouterConfig, weights: Path) -> torch.nn.Module:
    if not weights.is_file():
        raise TwinError(f"{weights} is missing")
    head = head_from_spec(cfg.head.model_dump())
    state = load_file(str(weights))
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise TwinError(f"{weights} does not match the head in {CONFIG_FILE}: expected {expected}, found {got}")
    head.load_state_dict(state)
    if cfg.head.n != len(cfg.experts):
        raise TwinError(f"{CONFIG_FILE}: head has {cfg.head.n} outputs for {len(cfg.experts)} experts")
    return head.eval()


def load_router(artifact: Artifact | str | Path, *, model: torch.nn.Module | None = None, tokenizer=None,
                device: str = "cpu") -> Router:
    """The router saved in ARTIFACT/router/, offline.

    For a "hidden" router, pass an already-loaded core `model` + `tokenizer` to reuse them; otherwise the
    artifact's core/ is loaded. Raises TwinError if the saved expert order differs from the artifact's.
    """
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    cfg = read_config(art.router_dir)
    if cfg.experts != art.experts:
        raise TwinError(f"the router was trained for experts {cfg.experts} but the artifact has {art.experts}; "
                        "retrain it with `twinrt router train`")
    head = _load_head(cfg, art.router_dir / WEIGHTS_FILE)
    if cfg.encoder.type == "core":
        if model is not None:
            if tokenizer is None:
                raise TwinError("load_router: pass the core's tokenizer together with its model")
            encoder = CoreEncoder(model, tokenizer, max_length=cfg.encoder.max_length)
        else:
            encoder = CoreEncoder.from_dir(art.core_dir, device=device, max_length=cfg.encoder.max_length)
        cls: type[Router] = HiddenStateRouter
    else:
        encoder = SentenceEncoder(resolve_sentence_encoder(cfg.encoder.ref, art.router_dir), device=device,
                                  max_length=cfg.encoder.max_length)
        cls = EmbeddingRouter
    if encoder.dim != cfg.head.dim:
        raise TwinError(f"the router's head reads {cfg.head.dim} features but its encoder gives {encoder.dim}")
    return cls(cfg.experts, encoder, head, temperature=cfg.temperature, options=cfg.options)

