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
                   "note": str | null}],                                           # oldest first
      "statics": [{"label", "method", "params", "experts": [merged from], "created",
                   "tensors": {name: {"rank", "energy", "path"} | {"stored", "norm"}},
                   "size": {"factors", "dense"}}]                # static-merge arms; optional, [] if absent
    }

The core never changes after the split: `twinrt add` factors a new expert against it and `twinrt remove`
drops one expert's files, so `shared.experts` (what the core is made of) and the current `experts` (what can
be mixed) part ways; `history` says when and how. A manifest written before either existed reads as one split
of its current experts at `created`.

A static merge (`twinrt static add`, or `statics:` in the split config) is the arm `static:<label>`: the
same experts merged by another method or parameters, stored under static/<label>/ as its exact difference
from the core (θ_static − θ_core), laid out like an expert's directory: adapter factors where that difference
is exactly low rank (path "exact"), dense deltas elsewhere.

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
STATIC_DIR = "static"  # static/<label>/: a static merge's difference from the core, laid out as an expert's
STATIC_PREFIX = "static:"  # the arm (and mix column) name of a static merge


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


class StaticInfo(Frozen):
    """A static merge served beside the twin as the arm `static:<label>`: the experts merged by `method` with
    `params` (as the core is), stored as its exact difference from the core under static/<label>/ (PEFT
    adapter factors where that difference is exactly low rank, dense deltas elsewhere, nothing where zero)."""

    label: str
    method: str
    params: dict[str, Any]
    experts: list[str]                               # merged from, in mix order
    tensors: dict[str, FactorInfo | DenseInfo]       # every tensor of `tensors`: how its difference is stored
    size: ExpertSize
    created: str

    @field_validator("label")
    @classmethod
    def _label_ok(cls, v: str) -> str:
        return check_expert_name(v)


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
    statics: list[StaticInfo] = []  # static-merge arms, in the order they were added

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

    @property
    def static_labels(self) -> list[str]:
        return [s.label for s in self.statics]

    def static(self, label: str) -> StaticInfo:
        for s in self.statics:
            if s.label == label:
                return s
        raise KeyError(label)

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
    labels = m.static_labels
    for rel in m.files:
        parts = rel.split("/")
        if parts[0] == "experts" and (len(parts) < 3 or parts[1] not in known):
            raise ValueError(f"files lists {rel}, which belongs to no expert of experts ({', '.join(names)}); "
                             "was an expert renamed?")
        if parts[0] == STATIC_DIR and (len(parts) < 3 or parts[1] not in labels):
            raise ValueError(f"files lists {rel}, which belongs to no static merge of statics "
                             f"({', '.join(labels) or 'none'})")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate static labels: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    for st in m.statics:
        for f in EXPERT_FILES:
            if f"{STATIC_DIR}/{st.label}/{f}" not in m.files:
                raise ValueError(f"static merge {st.label!r} has no {STATIC_DIR}/{st.label}/{f} in files")
        if set(st.tensors) != set(m.tensors):
            raise ValueError(f"static merge {st.label!r} records other tensors than the artifact's")
        if any(isinstance(i, DenseInfo) and i.stored for i in st.tensors.values()) and \
                f"{STATIC_DIR}/{st.label}/dense.safetensors" not in m.files:
            raise ValueError(f"static merge {st.label!r} has stored dense deltas but files lacks "
                             f"{STATIC_DIR}/{st.label}/dense.safetensors")
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
