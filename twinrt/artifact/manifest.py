"""The `twin.json` manifest of a twinrt/1 artifact (Contract 1 of DESIGN.md).

    {
      "format": "twinrt/1", "twinrt_version": ..., "created": ISO-8601,
      "base": {"source", "kind": "hf"|"gguf", "fingerprint", "architecture", "model_type"},
      "shared": {"method", "params": {...}, "excluded": [tensor names kept from the base],
                 "experts": [the experts the core was merged from, kept when one of them is removed]},
      "exclusive": {"rank" | "energy", "svd", "dtype"},
      "experts": [{"name", "source", "kind": "full"|"lora", "fingerprint"}],          # mix order
      "tensors": {name: {"shape", "role": "factored"|"dense",
                         "experts": {expert: {"rank", "energy", "path"} | {"stored": bool, "norm"}}}},
      "sizes": {"core": bytes, "full_expert": bytes, "experts": {name: {"factors", "dense"}}, "router": bytes},
      "files": {relative path: sha256},
      "history": [{"op": "split"|"add"|"remove", "at": ISO-8601, "experts": [names], "twinrt_version",
                   "note": str | null}]                                            # oldest first
    }

The core never changes after the split: `twinrt add` factors a new expert against it and `twinrt remove`
drops one expert's files, so `shared.experts` (what the core is made of) and the current `experts` (what can
be mixed) part ways; `history` says when and how. A manifest written before either existed reads as one split
of its current experts at `created`.

The manifest is validated as a whole when it is read: expert names follow `EXPERT_NAME` (they become
directory names), every path in `files` is a plain relative path, and the experts, tensors, sizes and files
agree with each other (an expert renamed in twin.json alone no longer matches its files and is refused).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import field_validator, model_validator

from twinrt import adapter
from twinrt.validation import Frozen

FORMAT = "twinrt/1"
MANIFEST = "twin.json"
DIGEST = "twin.json.sha256"  # sha256sum-style line: "<sha256 of twin.json's bytes>  twin.json"

# An expert name is a single path component: letters, digits, '_', '.', '-'; no leading dot, no '..', ≤ 64
EXPERT_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch
RESERVED_NAMES = frozenset({"core", "twin", "base", "router"})  # the serving arms and artifact parts
EXPERT_FILES = (adapter.CONFIG_FILE, adapter.WEIGHTS_FILE)  # every expert dir has these (a PEFT adapter)


def check_expert_name(name: str) -> str:
    """`name` if it can name an expert (and its directory experts/<name>/); ValueError saying why not."""
    if not isinstance(name, str) or not EXPERT_NAME.fullmatch(name):
        raise ValueError(f"expert name {name!r} must be 1-64 letters, digits, '_', '.', '-', not start with "
                         "a dot and not contain '..'")
    if name in RESERVED_NAMES:
        raise ValueError(f"expert name {name!r} is reserved ({', '.join(sorted(RESERVED_NAMES))})")
    return name


def check_relpath(rel: str) -> str:
    """`rel` if it is a plain relative POSIX path inside a directory (no '..', '.', empty parts, '\\')."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or "\0" in rel
            or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"file path {rel!r} is not a plain relative path inside the artifact")
    return rel


class BaseInfo(Frozen):
    source: str
    kind: Literal["hf", "gguf"]
    fingerprint: str
    architecture: str | None
    model_type: str | None


class SharedInfo(Frozen):
    method: str
    params: dict[str, Any]
    excluded: list[str] = []
    experts: list[str] = []  # the experts the core was merged from (filled from `experts` for older manifests)


class HistoryEvent(Frozen):
    """One change of the artifact's expert set: the split that made the core, or a later add / remove."""

    op: Literal["split", "add", "remove"]
    at: str  # ISO-8601, UTC
    experts: list[str]
    twinrt_version: str
    note: str | None = None


class ExclusiveInfo(Frozen):
    rank: int | None = None
    energy: float | None = None
    svd: str
    dtype: str


class ExpertInfo(Frozen):
    name: str
    source: str
    kind: Literal["full", "lora"]
    fingerprint: str

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_expert_name(v)


class FactorInfo(Frozen):
    rank: int
    energy: float
    path: str


class DenseInfo(Frozen):
    stored: bool  # False: the delta is exactly zero and nothing is stored
    norm: float


class TensorInfo(Frozen):
    shape: list[int]
    role: Literal["factored", "dense"]
    experts: dict[str, FactorInfo | DenseInfo]


class ExpertSize(Frozen):
    factors: int
    dense: int


class Sizes(Frozen):
    core: int
    full_expert: int  # bytes of one full model at the artifact's dtype: the yardstick for compression
    experts: dict[str, ExpertSize]
    router: int = 0


class Manifest(Frozen):
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
    history: list[HistoryEvent]

    @model_validator(mode="before")
    @classmethod
    def _older(cls, data: Any) -> Any:
        # manifests written before add/remove existed: one split of the experts they have, at `created`
        if not isinstance(data, dict):
            return data
        data = dict(data)
        names = [e.get("name") if isinstance(e, dict) else getattr(e, "name", None) for e in data.get("experts", [])]
        shared = data.get("shared")
        if isinstance(shared, dict) and "experts" not in shared:
            data["shared"] = {**shared, "experts": names}
        elif isinstance(shared, SharedInfo) and "experts" not in shared.model_fields_set:
            data["shared"] = shared.model_copy(update={"experts": names})
        data.setdefault("history", [{"op": "split", "at": data.get("created", ""), "experts": names,
                                     "twinrt_version": data.get("twinrt_version", "")}])
        return data

    @field_validator("files")
    @classmethod
    def _paths(cls, files: dict[str, str]) -> dict[str, str]:
        for rel in files:
            check_relpath(rel)
        return files

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        _check_consistent(self)
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def in_core(self, expert: str) -> bool:
        """Whether the expert of this name is one the core was merged from: the last event of the history that
        names it is the split (one removed and added again, perhaps another model, came later)."""
        last = [e.op for e in self.history if expert in e.experts]
        return bool(last) and last[-1] == "split"

    def factored(self, expert: str) -> dict[str, FactorInfo]:
        """Factored tensors of one expert with rank > 0: weight name -> rank/energy."""
        out = {}
        for name, t in self.tensors.items():
            info = t.experts.get(expert)
            if t.role == "factored" and isinstance(info, FactorInfo) and info.rank > 0:
                out[name] = info
        return out


def _check_consistent(m: Manifest) -> None:
    """Raise ValueError where the experts, tensors, sizes, files and history of `m` disagree."""
    names = m.expert_names
    if not m.history or m.history[0].op != "split" or any(e.op == "split" for e in m.history[1:]):
        raise ValueError("history must start with the one split that made the core")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate expert names: {', '.join(dup)}")
    known = set(names)
    for rel in m.files:
        parts = rel.split("/")
        if parts[0] == "experts" and (len(parts) < 3 or parts[1] not in known):
            raise ValueError(f"files lists {rel}, which belongs to no expert of experts ({', '.join(names)}); "
                             "was an expert renamed?")
    for name in names:
        for f in EXPERT_FILES:
            if f"experts/{name}/{f}" not in m.files:
                raise ValueError(f"expert {name!r} has no experts/{name}/{f} in files; was it renamed?")
    if set(m.sizes.experts) != known:
        raise ValueError(f"sizes.experts names {sorted(m.sizes.experts)}, experts names {sorted(known)}")
    for tname, t in m.tensors.items():
        if set(t.experts) != known:
            raise ValueError(f"tensor {tname} has entries for {sorted(t.experts)}, experts names {sorted(known)}")
        for name, info in t.experts.items():
            if isinstance(info, DenseInfo) and info.stored and f"experts/{name}/dense.safetensors" not in m.files:
                raise ValueError(f"tensor {tname} has a stored dense delta for {name!r} but files lacks "
                                 f"experts/{name}/dense.safetensors")
