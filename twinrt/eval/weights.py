"""The weights of the eval's plain arms, streamed tensor by tensor from the base and the original experts.

    expert_weights(src, n):               θ_n                               (the original expert, exactly)
    merge_weights(src, m, params, stats): θ_base + merge_tensor(m, params, name, τ [N, ...], stats(name))
                                          for every float tensor, τ_i = θ_i − θ_base: the split's own
                                          per-tensor merge (twinrt.merge.tensor); stats: the experts'
                                          calibration statistics, for the methods that need data

so a static merge with the split's own method and parameters reproduces the artifact's core tensor for tensor
(random methods draw the same keep masks). Tensors the split excluded from the merge
(`manifest.shared.excluded`) stay the base's, and so do tensors no expert changed.
Only one tensor per expert is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twinrt.artifact.manifest import Manifest
from twinrt.errors import TwinError
from twinrt.merge import MergeMethod, TensorStats, merge_tensor
from twinrt.sources.checkpoint import GGUFFile, SafetensorsDir, open_base
from twinrt.sources.experts import FullExpert, LoraExpert, check_compatible, open_expert
from twinrt.sources.model import expert_tensors

Weights = Iterator[tuple[str, torch.Tensor]]


@dataclass
class Sources:
    """The base and the original experts (artifact mix order) an artifact was split from."""

    base: SafetensorsDir | GGUFFile
    experts: dict[str, LoraExpert | FullExpert]
    excluded: frozenset[str] = frozenset()  # tensor names the core keeps from the base

    def stored_bytes(self, expert: str) -> int:
        """What the expert itself stores: its adapter file (LoRA) or its safetensors weights (full)."""
        e = self.experts[expert]
        if isinstance(e, LoraExpert):
            return (e.path / "adapter_model.safetensors").stat().st_size
        return sum(f.stat().st_size for f in e.files())


def open_sources(base: Path, experts: Mapping[str, Path], excluded: frozenset[str] = frozenset()) -> Sources:
    """Open the base (HF dir or GGUF) and each expert (HF dir or PEFT LoRA adapter over the base)."""
    b = open_base(Path(base))
    opened = {name: open_expert(Path(path), name, b) for name, path in experts.items()}
    for e in opened.values():
        check_compatible(b, b.config, e)
    return Sources(b, opened, excluded)


def sources_of(manifest: Manifest, *, base: Path | None = None, experts: Mapping[str, Path] | None = None,
               check_fingerprints: bool = True) -> Sources:
    """The sources named in an artifact's manifest (paths overridable), checked against its fingerprints."""
    overrides = dict(experts or {})
    unknown = sorted(set(overrides) - set(manifest.expert_names))
    if unknown:
        raise TwinError(f"--expert-path names expert(s) the artifact does not have: {', '.join(unknown)}")
    base_path = Path(base) if base is not None else Path(manifest.base.source)
    if not base_path.exists():
        raise TwinError(f"the artifact's base {base_path} does not exist here; pass --base PATH")
    paths: dict[str, Path] = {}
    for info in manifest.experts:
        p = Path(overrides.get(info.name, info.source))
        if not p.exists():
            raise TwinError(f"the original expert {info.name!r} ({p}) does not exist here; pass "
                            f"--expert-path {info.name}=PATH")
        paths[info.name] = p
    src = open_sources(base_path, paths, frozenset(manifest.shared.excluded))
    if check_fingerprints:
        if src.base.fingerprint() != manifest.base.fingerprint:
            raise TwinError(f"base {base_path} is not the model the artifact was split from (fingerprint differs)")
        for info in manifest.experts:
            if src.experts[info.name].fingerprint() != info.fingerprint:
                raise TwinError(f"expert {info.name!r} at {paths[info.name]} is not the one the artifact was split "
                                "from (fingerprint differs)")
    return src


def expert_weights(src: Sources, expert: str) -> Weights:
    """(name, θ_expert) for every tensor of the base, in the base's tensor order."""
    if expert not in src.experts:
        raise TwinError(f"unknown expert {expert!r}; known: {', '.join(src.experts)}")
    yield from expert_tensors(src.base, src.experts[expert])


def merge_weights(src: Sources, method: MergeMethod, params: Mapping[str, Any],
                  stats: Callable[[str], TensorStats] | None = None) -> Weights:
    """(name, θ_base + merge(τ)) in float32 for float tensors (non-float ones are the base's, unchanged).

    `stats(name)`: the experts' calibration statistics of a tensor, for a method that needs data."""
    experts = list(src.experts.values())
    for name in src.base.names():
        base_t = src.base.get(name)
        if not base_t.is_floating_point():
            yield name, base_t
            continue
        thetas = [e.get(name, base_t) for e in experts]
        base32 = base_t.float()
        if name in src.excluded or all(t is base_t for t in thetas):  # τ = 0 for all: every method gives 0
            yield name, base32
            continue
        tau = torch.stack([t.float() for t in thetas]) - base32  # [N, ...]
        del thetas
        tensor_stats = stats(name) if stats is not None and method.statistics(params) else None
        yield name, base32 + merge_tensor(method, params, name, tau, tensor_stats).tau
