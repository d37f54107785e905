"""Writing one twinrt/1 artifact's files tensor by tensor: the core, each expert's adapter and dense deltas,
and the manifest that records them (Contract 1).

    core/                                  save_core(config, tokenizer, ...) and add_core(name, θ_core)
    experts/<e>/adapter_model.safetensors  add_factored(name, shape, {e: factors}): PEFT LoRA A/B per module
    experts/<e>/adapter_config.json        written by finish(), from the ranks added (twinrt.adapter)
    experts/<e>/dense.safetensors          add_dense(name, shape, {e: delta}): only deltas that are not zero
    twin.json, twin.json.sha256            finish(...): every file's sha256, the sizes, what was added

The writer fills a directory being assembled (atomic_dir's temp dir); it never renames anything itself.
`twinrt add` uses the same writer without a core (`core=False`: the artifact's core is kept) and merges what
`finish_experts()` returns into the existing manifest, so an added expert's files are written exactly as a
split writes them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from twinrt import __version__, adapter
from twinrt.artifact.manifest import (
    FORMAT,
    BaseInfo,
    DenseInfo,
    ExclusiveInfo,
    ExpertInfo,
    ExpertSize,
    FactorInfo,
    HistoryEvent,
    Manifest,
    SharedInfo,
    Sizes,
    TensorInfo,
)
from twinrt.artifact.store import checksum_tree, write_manifest
from twinrt.artifact.stwriter import SafetensorsWriter

_ONE_FILE = 1 << 62  # an expert's factors and deltas are never sharded (PEFT and vLLM read one file)


class Factored(Protocol):
    """Truncated-SVD factors of one expert's delta of one matrix: `B A ≈ delta` (see twinrt.split.svd)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    rank: int
    energy: float
    path: str


@dataclass
class _ExpertFiles:
    factors: SafetensorsWriter
    dense: SafetensorsWriter
    ranks: dict[str, int] = field(default_factory=dict)  # module -> rank (> 0)


def now() -> str:
    """The current UTC time as the manifest writes it (ISO-8601, seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class ArtifactWriter:
    """Assembles an artifact in `root` for `experts` (in mix order); tensors are stored as `dtype`.

    `core=False`: only the experts' files (the core is there already and stays as it is); `subdir`: where
    the experts' dirs go ("static" for a static merge, laid out as an expert)."""

    def __init__(self, root: Path, experts: Sequence[str], dtype: torch.dtype, *, core: bool = True,
                 subdir: str = "experts") -> None:
        self.root = Path(root)
        self.subdir = subdir
        self.dtype = dtype
        self.core_dir = self.root / "core"
        self.core: SafetensorsWriter | None = None
        if core:
            self.core_dir.mkdir()
            self.core = SafetensorsWriter(self.core_dir, "model")
        self.experts: dict[str, _ExpertFiles] = {}
        for name in experts:
            d = self.expert_dir(name)
            d.mkdir(parents=True)
            self.experts[name] = _ExpertFiles(SafetensorsWriter(d, "adapter_model", max_shard_bytes=_ONE_FILE),
                                              SafetensorsWriter(d, "dense", max_shard_bytes=_ONE_FILE))
        self.tensors: dict[str, TensorInfo] = {}

    def expert_dir(self, name: str) -> Path:
        return self.root / self.subdir / name

    def save_core(self, *parts: Any) -> None:
        """`part.save_pretrained(core/)` for each: the config, tokenizer and generation config that make core/ a
        checkpoint transformers loads as is."""
        for part in parts:
            part.save_pretrained(self.core_dir)

    def add_core(self, name: str, tensor: torch.Tensor) -> None:
        """θ_core of tensor `name`, stored as given (the caller casts float tensors to the artifact's dtype)."""
        if self.core is None:
            raise ValueError("this writer keeps the artifact's core (core=False)")
        self.core.add(name, tensor)

    def add_factored(self, name: str, shape: Sequence[int], factors: Mapping[str, Factored]) -> None:
        """Each expert's factors of weight `name` (an expert of rank 0 stores nothing, its entry says so)."""
        module = name.removesuffix(".weight")
        a_key, b_key = adapter.lora_keys(module)
        per_expert: dict[str, FactorInfo | DenseInfo] = {}
        for expert, f in factors.items():
            per_expert[expert] = FactorInfo(rank=f.rank, energy=round(f.energy, 6), path=f.path)
            if f.rank:
                files = self.experts[expert]
                files.factors.add(a_key, f.a.to(self.dtype))
                files.factors.add(b_key, f.b.to(self.dtype))
                files.ranks[module] = f.rank
        self.tensors[name] = TensorInfo(shape=list(shape), role="factored", experts=per_expert)

    def add_dense(self, name: str, shape: Sequence[int], deltas: Mapping[str, torch.Tensor]) -> None:
        """Each expert's exact delta of tensor `name`; a delta that is exactly zero is recorded, not stored."""
        per_expert: dict[str, FactorInfo | DenseInfo] = {}
        for expert, d in deltas.items():
            norm = float(torch.linalg.vector_norm(d, dtype=torch.float64))
            per_expert[expert] = DenseInfo(stored=norm > 0.0, norm=norm)
            if norm > 0.0:
                self.experts[expert].dense.add(name, d.to(self.dtype))
        self.tensors[name] = TensorInfo(shape=list(shape), role="dense", experts=per_expert)

    def add_unchanged(self, name: str, shape: Sequence[int]) -> None:
        """Tensor `name` is the core's in every expert (no delta at all): recorded, nothing stored."""
        self.tensors[name] = TensorInfo(shape=list(shape), role="dense",
                                        experts={e: DenseInfo(stored=False, norm=0.0) for e in self.experts})

    def finish_experts(self) -> dict[str, ExpertSize]:
        """Close every expert's files and write its adapter config; -> each expert's stored bytes."""
        sizes = {}
        for name, files in self.experts.items():
            files.factors.close()
            if files.dense.names:
                files.dense.close()
            adapter.write_config(self.expert_dir(name), files.ranks)
            sizes[name] = ExpertSize(factors=files.factors.total_bytes, dense=files.dense.total_bytes)
        return sizes

    def finish(self, *, base: BaseInfo, shared: SharedInfo, exclusive: ExclusiveInfo,
               experts: list[ExpertInfo]) -> Manifest:
        """Close every file, write the adapters' configs and then the manifest over all of them; -> the manifest."""
        if self.core is None:
            raise ValueError("finish() writes a whole artifact; a writer without a core has finish_experts()")
        self.core.close()
        sizes = self.finish_experts()
        created = now()
        names = [e.name for e in experts]
        manifest = Manifest(
            format=FORMAT, twinrt_version=__version__, created=created,
            base=base, shared=shared.model_copy(update={"experts": names}), exclusive=exclusive, experts=experts,
            tensors=self.tensors,
            # one full model at the artifact's dtype is as large as the core, which stores every tensor so
            sizes=Sizes(core=self.core.total_bytes, full_expert=self.core.total_bytes, experts=sizes),
            files=checksum_tree(self.root),
            history=[HistoryEvent(op="split", at=created, experts=names, twinrt_version=__version__)],
        )
        write_manifest(self.root, manifest)
        return manifest
