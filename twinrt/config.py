"""The split config (YAML), validated once at the boundary into frozen values.

    base: path/to/base                      # HF model dir, or a .gguf file
    experts:
      - {name: math, path: path/to/math}    # full fine-tuned HF dir, or a PEFT LoRA adapter dir over base
        calibration: {data: math.jsonl, samples: 128, max_tokens: 65536, batch_size: 8}   # or just: math.jsonl
    shared: {method: ties, scaling: 1.0, density: 0.2}
    exclusive: {rank: 16}                   # or {energy: 0.95}; optional svd: auto | full | randomized
    dtype: float32
    statics:                                # optional: static merges served beside the twin as static:<label>
      - {label: ties, method: ties, density: 0.2}
      - {label: ta05, method: task_arithmetic, scaling: 0.5}

Relative paths are resolved against the config file's directory. Unknown keys are errors. A method that needs
data (fisher, regmean, mats: `statistics()` of its parameters) needs `calibration` for every expert; data-free
methods ignore it. What the calibration file holds is checked when the split reads it (twinrt.split.calibration).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from twinrt.artifact.manifest import RESERVED_NAMES, check_expert_name
from twinrt.dtypes import DtypeName
from twinrt.errors import TwinError
from twinrt.merge import get_method
from twinrt.validation import Frozen, describe

__all__ = ["RESERVED_NAMES", "SplitConfig", "check_device", "load_config", "parse_config"]


class CalibrationSpec(Frozen):
    """An expert's calibration data: a JSONL of its own examples, the first `samples` of them, stopping before
    the example that would take the total past `max_tokens` tokens (no limit when None)."""

    data: Path
    samples: int = Field(default=128, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)  # examples per forward pass (1 when Fishers are collected)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"data": data} if isinstance(data, str) else data  # `calibration: file.jsonl`


class ExpertSpec(Frozen):
    name: str
    path: Path
    calibration: CalibrationSpec | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_expert_name(v)  # the same rule the manifest checks: a name becomes experts/<name>/


def _method_params(data: dict[str, Any], own_keys: tuple[str, ...], where: str) -> tuple[dict[str, Any], Any, dict]:
    """A config mapping that names a merge `method` beside its parameters -> (its own keys, the method, the
    parameters validated with defaults filled in); TwinError for an unknown method or parameter, naming `where`."""
    own = {k: data[k] for k in own_keys if k in data}
    given = {k: v for k, v in data.items() if k not in own}
    method = get_method(data["method"])
    try:
        return own, method, method.resolve(given)
    except TwinError as e:  # the registry names the config's `shared.` section
        raise TwinError(str(e).replace("shared.", where, 1)) from None


class SharedSpec(Frozen):
    """`method` plus that method's parameters, written beside it in the YAML and validated by the method's own
    parameter model (twinrt.merge.registry): `params` holds them with the method's defaults filled in."""

    method: str
    exclude: tuple[str, ...] = ()  # regexes of tensor names the core keeps from the base (not merged)
    params: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _method_params(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            return data  # not a mapping, or no method name: the field checks say what is wrong
        own, _, params = _method_params(data, ("method", "exclude"), "shared.")
        return {**own, "params": params}

    @model_validator(mode="after")
    def _regexes(self) -> SharedSpec:
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"shared.exclude pattern {pattern!r} is not a valid regex: {e}") from None
        return self


class ExclusiveSpec(Frozen):
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)
    svd: Literal["auto", "full", "randomized"] = "auto"

    @model_validator(mode="after")
    def _one_of(self) -> ExclusiveSpec:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("exclusive needs exactly one of `rank` (an int) or `energy` (a share in (0, 1])")
        if self.energy is not None and self.svd == "randomized":
            raise ValueError("exclusive.energy needs the full spectrum: use svd: full or auto")
        return self


class StaticSpec(Frozen):
    """A static merge to store beside the twin (twinrt.split.static): a label, a data-free method and its
    parameters, written beside them and validated by the method's parameter model."""

    label: str
    method: str
    params: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _method_params(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            return data
        own, method, params = _method_params(data, ("label", "method"), f"statics[{data.get('label')!r}].")
        if method.statistics(params):
            raise TwinError(f"statics[{data.get('label')!r}]: method {method.name!r} needs calibration statistics; "
                            "a static merge takes a data-free method")
        return {**own, "params": params}

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        return check_expert_name(v)


class SplitConfig(Frozen):
    base: Path
    experts: tuple[ExpertSpec, ...] = Field(min_length=1)
    shared: SharedSpec
    exclusive: ExclusiveSpec
    dtype: DtypeName = "float32"
    statics: tuple[StaticSpec, ...] = ()

    @field_validator("statics")
    @classmethod
    def _unique_statics(cls, statics: tuple[StaticSpec, ...]) -> tuple[StaticSpec, ...]:
        labels = [s.label for s in statics]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"duplicate static labels: {', '.join(dup)}")
        return statics

    @field_validator("experts")
    @classmethod
    def _unique(cls, experts: tuple[ExpertSpec, ...]) -> tuple[ExpertSpec, ...]:
        names = [e.name for e in experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate expert names: {', '.join(dup)}")
        return experts


def parse_config(data: Any, root: Path | None = None) -> SplitConfig:
    """Validate a config mapping; relative paths resolve against `root` (the config file's directory)."""
    if not isinstance(data, dict):
        raise TwinError("split config must be a mapping (base, experts, shared, exclusive, dtype)")
    try:
        cfg = SplitConfig.model_validate(data)
    except ValidationError as e:
        raise TwinError(f"invalid split config: {describe(e)}") from None
    _check_calibration(cfg)
    if root is None:
        return cfg
    resolve = lambda p: p if p.is_absolute() else (root / p)  # noqa: E731

    def expert(e: ExpertSpec) -> ExpertSpec:
        calib = e.calibration and e.calibration.model_copy(update={"data": resolve(e.calibration.data)})
        return e.model_copy(update={"path": resolve(e.path), "calibration": calib})

    return cfg.model_copy(update={"base": resolve(cfg.base), "experts": tuple(expert(e) for e in cfg.experts)})


def _check_calibration(cfg: SplitConfig) -> None:
    """Refuse a method that needs data when an expert has no calibration data, naming them."""
    method = get_method(cfg.shared.method)
    needs = method.statistics(cfg.shared.params)
    lacking = [e.name for e in cfg.experts if e.calibration is None]
    if needs and lacking:
        raise TwinError(f"shared.method {method.name!r} needs calibration data for every expert; "
                        f"{', '.join(repr(n) for n in lacking)} {'has' if len(lacking) == 1 else 'have'} none "
                        "(add `calibration: FILE.jsonl` to the expert)")


def load_config(path: str | Path) -> SplitConfig:
    """Read and validate a split config YAML file."""
    path = Path(path)
    if not path.is_file():
        raise TwinError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TwinError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    return parse_config(data, root=path.parent)


def check_device(spec: str, flag: str = "--device") -> str:
    """`spec` if torch can parse it and that device is usable here; TwinError naming `flag` otherwise."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as e:
        raise TwinError(f"{flag} {spec!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cpu":
        return spec
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TwinError(f"{flag} {spec!r}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TwinError(f"{flag} {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return spec
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # torch raises RuntimeError, AssertionError, ... for a backend that is not built
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TwinError(f"{flag} {spec!r} is not usable on this machine: {why}") from None
    return spec
