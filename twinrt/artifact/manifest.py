"""The `twin.json` manifest of a twinrt/1 artifact (Contract 1 of DESIGN.md).

    {
      "format": "twinrt/1", "twinrt_version": ..., "created": ISO-8601,
      "base": {"source", "kind": "hf"|"gguf", "fingerprint", "architecture", "model_type"},
      "shared": {"method", "params": {...}, "excluded": [tensor names kept from the base]},
      "exclusive": {"rank" | "energy", "svd", "dtype"},
      "experts": [{"name", "source", "kind": "full"|"lora", "fingerprint"}],          # mix order
      "tensors": {name: {"shape", "role": "factored"|"dense",
                         "experts": {expert: {"rank", "energy", "path"} | {"stored": bool, "norm"}}}},
      "sizes": {"core": bytes, "full_expert": bytes, "experts": {name: {"factors", "dense"}}, "router": bytes},
      "files": {relative path: sha256}
    }
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

FORMAT = "twinrt/1"
MANIFEST = "twin.json"


class _M(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseInfo(_M):
    source: str
    kind: Literal["hf", "gguf"]
    fingerprint: str
    architecture: str | None
    model_type: str | None


class SharedInfo(_M):
    method: str
    params: dict[str, Any]
    excluded: list[str] = []


class ExclusiveInfo(_M):
    rank: int | None = None
    energy: float | None = None
    svd: str
    dtype: str


class ExpertInfo(_M):
    name: str
    source: str
    kind: Literal["full", "lora"]
    fingerprint: str


class FactorInfo(_M):
    rank: int
    energy: float
    path: str


class DenseInfo(_M):
    stored: bool  # False: the delta is exactly zero and nothing is stored
    norm: float


class TensorInfo(_M):
    shape: list[int]
    role: Literal["factored", "dense"]
    experts: dict[str, FactorInfo | DenseInfo]


class ExpertSize(_M):
    factors: int
    dense: int


class Sizes(_M):
    core: int
    full_expert: int  # bytes of one full model at the artifact's dtype: the yardstick for compression
    experts: dict[str, ExpertSize]
    router: int = 0


class Manifest(_M):
    format: str
    twinrt_version: str
    created: str
    base: BaseInfo
    shared: SharedInfo
    exclusive: ExclusiveInfo
    experts: list[ExpertInfo]
    tensors: dict[str, TensorInfo]
    sizes: Sizes
    files: dict[str, str]

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def factored(self, expert: str) -> dict[str, FactorInfo]:
        """Factored tensors of one expert with rank > 0: weight name -> rank/energy."""
        out = {}
        for name, t in self.tensors.items():
            info = t.experts.get(expert)
            if t.role == "factored" and isinstance(info, FactorInfo) and info.rank > 0:
                out[name] = info
        return out
