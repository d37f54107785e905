"""Static merges as arms beside the twin: `twinrt static add ARTIFACT LABEL --method M [--set K=V ...]`.

A static merge is what a user would otherwise ship: the artifact's experts merged by one registered method
and parameters (TIES at density 0.2, DARE-TIES, task arithmetic at λ 0.5, ...). It is computed from the
original sources, exactly as a split computes the core (τ_i = θ_i − θ_base in float32, the method's merge
per tensor with the same per-tensor seeds and the core's excluded tensors, θ_static = θ_base + τ_merged cast
to the artifact's dtype), and stored as its difference from the stored core, Δ = θ_static − θ_core, under
static/<label>/ in an expert's layout:

- a weight the experts adapt through LoRA factors, where Δ is low rank (linear merges of LoRA experts over a
  linear core: rank ≤ Σ of their ranks): PEFT factors B A = Δ to the artifact dtype's rounding (the largest
  entry of Δ − B A is at most 4 ulps of the largest |θ_static|), path "exact";
- any other tensor: the dense Δ, or nothing where Δ is exactly zero.

The runtime serves it as the mix column `static:<label>` (weight 1, no other column), so `core + Δ` equals the
static model; data-based methods (Fisher, RegMean, MaTS) need calibration statistics, which only a split
collects, and are refused here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twinrt.artifact.manifest import STATIC_DIR, ExpertSize, Manifest, StaticInfo, check_expert_name
from twinrt.artifact.store import Artifact, checksum_tree, write_manifest
from twinrt.artifact.writer import ArtifactWriter, now
from twinrt.dtypes import DTYPES
from twinrt.errors import TwinError
from twinrt.merge import get_method, merge_tensor
from twinrt.sources.checkpoint import SafetensorsDir
from twinrt.sources.experts import LoraExpert, open_expert
from twinrt.split.add import open_artifact_base
from twinrt.split.run import check_finite, task_vectors

ULPS = 4  # how far B A may be from Δ, in units of the dtype's rounding of the largest |θ_static|
OVERSAMPLE = 8  # extra columns of the range finder beyond the rank bound


@dataclass(frozen=True)
class ExactFactors:
    """`B A = Δ` to the dtype's rounding (the writer's Factored)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    rank: int
    energy: float = 1.0
    path: str = "exact"


def exact_low_rank(delta: torch.Tensor, bound: int, tol: float, seed: int = 0) -> ExactFactors | None:
    """Factors of `delta: [out, in]` with max |delta − B A| ≤ tol at the smallest rank that allows it (at most
    `bound` + OVERSAMPLE), when storing them is smaller than the dense delta; None otherwise. A randomized range
    finder in float64 (Q from delta·G, A = Qᵀ delta), then the small SVD of A trims the rank."""
    out, inn = delta.shape
    if bound <= 0 or bound * (out + inn) >= out * inn:
        return None
    k = min(bound + OVERSAMPLE, out, inn)
    d = delta.double()
    g = torch.randn(inn, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(d @ g)  # [out, k]
    a = q.T @ d  # [k, in]
    if float((d - q @ a).abs().max()) > tol:
        return None
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    for r in range(1, k + 1):  # the smallest rank within the tolerance
        if r * (out + inn) >= out * inn:
            return None
        b_r, a_r = q @ u[:, :r], s[:r, None] * vh[:r]
        if float((d - b_r @ a_r).abs().max()) <= tol:
            return ExactFactors(a_r.float(), b_r.float(), r)
    return None


def resolve_static(method_name: str, params: Mapping[str, Any], n_experts: int) -> tuple[Any, dict[str, Any]]:
    """(method, resolved params) of a static merge; TwinError for an unknown method, bad parameters, or a
    data-based method."""
    method = get_method(method_name)
    try:
        resolved = method.resolve(params)
        method.check(resolved, n_experts)
    except TwinError as e:
        raise TwinError(str(e).replace("shared.", "static merge ", 1)) from None
    if method.statistics(resolved):
        raise TwinError(f"method {method.name!r} needs calibration statistics of every expert, which only a split "
                        "collects; a static merge takes a data-free method (task_arithmetic, ties, dare_ties, ...)")
    return method, resolved


def add_static(artifact: Path | str, label: str, method_name: str, params: Mapping[str, Any], *,
               base: Path | None = None, device: str = "cpu",
               progress: Callable[[int], Callable[[str], None]] | None = None) -> Manifest:
    """Add the static merge `label` (served as `static:<label>`) of the artifact's experts by `method_name`
    with `params`, computed from their original sources (see the module docstring); atomically. -> the new
    manifest."""
    art = Artifact.open(artifact)
    m = art.manifest
    try:
        check_expert_name(label)
    except ValueError as e:
        raise TwinError(str(e).replace("expert name", "static label", 1)) from None
    if label in m.static_labels:
        raise TwinError(f"static merge {label!r} is already in {art.path} (twinrt static remove it first)")
    method, resolved = resolve_static(method_name, params, len(m.experts))
    src = open_artifact_base(art, base)
    experts = {}
    for e in m.experts:
        path = Path(e.source)
        if not path.exists():
            raise TwinError(f"expert {e.name!r}'s source {path} (recorded in the manifest) does not exist here; a "
                            "static merge is computed from the original experts")
        ex = open_expert(path, e.name, src)
        if ex.fingerprint() != e.fingerprint:
            raise TwinError(f"expert {e.name!r}'s source {path} has changed since it was added (fingerprint "
                            f"{ex.fingerprint()[:19]}…, the manifest has {e.fingerprint[:19]}…)")
        experts[e.name] = ex
    lora = all(isinstance(x, LoraExpert) for x in experts.values())
    store = DTYPES[m.exclusive.dtype]
    core = SafetensorsDir(art.core_dir, what="core")
    excluded = set(m.shared.excluded)
    names = src.names()
    tick = progress(len(names)) if progress else None
    with art.staged() as stage:
        writer = ArtifactWriter(stage, [label], store, core=False, subdir=STATIC_DIR)
        for name in names:
            base_t = src.get(name)
            check_finite(base_t, name, f"base {src.label}")
            if base_t.is_floating_point():  # integer tensors are the base's in every expert, the core and here
                delta, static_t = _static_delta(name, base_t, experts, method, resolved, excluded, core, store,
                                                device)
                factors = None
                if lora and m.tensors[name].role == "factored" and bool(delta.any()):
                    bound = sum(x.loras[name].rank for x in experts.values() if name in x.loras)
                    tol = ULPS * torch.finfo(store).eps * float(static_t.abs().max())
                    factors = exact_low_rank(delta, bound, tol)
                if factors is not None:
                    writer.add_factored(name, base_t.shape, {label: factors})
                else:
                    writer.add_dense(name, base_t.shape, {label: delta})
                del delta, static_t
            if tick:
                tick(name)
        size: ExpertSize = writer.finish_experts()[label]
        info = StaticInfo(label=label, method=method.name, params=resolved, experts=list(experts),
                          tensors={t: i.experts[label] for t, i in writer.tensors.items()},
                          size=size, created=now())
        files = dict(m.files)
        files.update({f"{STATIC_DIR}/{label}/{k}": v for k, v in checksum_tree(stage / STATIC_DIR / label).items()})
        manifest = Manifest.model_validate({**m.model_dump(), "files": dict(sorted(files.items())),
                                            "statics": [*m.model_dump()["statics"], info.model_dump()]})
        write_manifest(stage, manifest)
    art.manifest = manifest
    return manifest


def remove_static(artifact: Path | str, label: str) -> Manifest:
    """Remove the static merge `label` (its static/<label>/ and manifest entry), atomically."""
    art = Artifact.open(artifact)
    m = art.manifest
    if label not in m.static_labels:
        raise TwinError(f"unknown static merge {label!r}; {art.path} has: {', '.join(m.static_labels) or 'none'}")
    prefix = f"{STATIC_DIR}/{label}/"
    with art.staged([f"{STATIC_DIR}/{label}"]) as stage:
        manifest = Manifest.model_validate({
            **m.model_dump(), "files": {k: v for k, v in m.files.items() if not k.startswith(prefix)},
            "statics": [s.model_dump() for s in m.statics if s.label != label]})
        write_manifest(stage, manifest)
    art.manifest = manifest
    return manifest


def _static_delta(name: str, base_t: torch.Tensor, experts: Mapping[str, Any], method, params: Mapping[str, Any],
                  excluded: set[str], core: SafetensorsDir, store: torch.dtype,
                  device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ = θ_static − θ_core in float32, θ_static) of one floating tensor."""
    base32 = base_t.to(device=device, dtype=torch.float32)
    if name in excluded:
        merged = torch.zeros_like(base32)
    else:
        tau = task_vectors(experts.values(), name, base_t, base32, device)  # [N, ...]
        merged = merge_tensor(method, params, name, tau).tau
        del tau
    static_t = (base32 + merged).to(store)
    delta = static_t.float() - core.get(name).to(device).float()
    return delta.cpu(), static_t.float().cpu()

