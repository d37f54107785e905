"""The offline split (Contract 1): one pass over tensor names, one tensor per expert in memory at a time.

For every tensor name: τ_i = θ_i − θ_base for all experts, θ_core = θ_base + merge(τ) (stored in the
artifact's dtype), and each expert's exclusive part d_i = θ_i − θ_core: truncated SVD factors for the
decoder's linear weights, exact dense deltas for everything else (norms, biases, embeddings).

A method that needs data (`method.statistics(params)`) first gets a statistics pass (twinrt.split.statistics):
every expert's calibration data is read and checked before anything is written, then each expert's statistics
are computed with its own weights, one expert at a time, into files inside the artifact's temp dir; the merge
reads them one tensor at a time. `statistics.json` in the artifact (listed with its sha256 in twin.json's
files) records what the pass cost per expert and what the method reported per tensor (MaTS: CG steps and
residual).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinrt.artifact.manifest import BaseInfo, ExclusiveInfo, ExpertInfo, Manifest, SharedInfo
from twinrt.artifact.store import atomic_dir, check_replaceable
from twinrt.artifact.writer import ArtifactWriter
from twinrt.config import ExclusiveSpec, SplitConfig
from twinrt.dtypes import DTYPES
from twinrt.errors import TwinError
from twinrt.merge import MergeMethod, TensorStats, get_method, merge_tensor, tensor_seed
from twinrt.sources.checkpoint import GGUFFile, SafetensorsDir, open_base
from twinrt.sources.experts import FullExpert, LoraExpert, check_compatible, open_expert
from twinrt.sources.model import expert_tensors, load_model
from twinrt.split.calibration import Calibration, load_calibration
from twinrt.split.statistics import ExpertCost, StatisticsFiles, StatisticsPlan, collect_statistics
from twinrt.split.svd import truncated_svd

Progress = Callable[[str], None]  # called once per tensor name (or calibration example), after it is done
STATISTICS_FILE = "statistics.json"
STATISTICS_FORMAT = "twinrt-statistics/1"


def _hf_config(base: SafetensorsDir | GGUFFile) -> Any:
    from transformers import AutoConfig

    if isinstance(base, GGUFFile):
        cfg = base.hf_config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        return cfg
    try:
        return AutoConfig.from_pretrained(base.path)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        raise TwinError(f"base {base.path}: config.json is not a config transformers can load: {e}"
                        .splitlines()[0]) from None


def decoder_linear_weights(config: Any) -> set[str]:
    """Weight names of every nn.Linear of the model except the output embedding (lm_head)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an architecture transformers does not know
        raise TwinError(f"base architecture {getattr(config, 'model_type', '?')!r} cannot be built by "
                        f"transformers: {e}".splitlines()[0]) from None
    head = model.get_output_embeddings()
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def _factored_weights(base: SafetensorsDir | GGUFFile, config: Any, ex: ExclusiveSpec) -> set[str]:
    """The weights that get factors; refused when the checkpoint lacks one or `ex.rank` exceeds every one."""
    linear = decoder_linear_weights(config)
    unknown = sorted(linear - set(base.names()))
    if unknown:
        raise TwinError(f"base {base.label}: its config's architecture has weights the checkpoint lacks, "
                        f"e.g. {unknown[0]}")
    widest = max((min(base.meta(n).shape) for n in linear), default=0)
    if ex.rank is not None and ex.rank > widest:
        raise TwinError(f"exclusive.rank {ex.rank} is larger than every factored matrix (the largest full rank "
                        f"is {widest}); narrower matrices are clamped, but this rank stores more than dense")
    return linear


def _core_files(base: SafetensorsDir | GGUFFile, config: Any, dtype: str) -> tuple[Any, ...]:
    """config, tokenizer and generation config of the core, so that transformers loads core/ as is."""
    from transformers import AutoTokenizer, GenerationConfig

    config.dtype = dtype
    try:
        if isinstance(base, GGUFFile):
            tok = AutoTokenizer.from_pretrained(base.path.parent, gguf_file=base.path.name)
        else:
            tok = AutoTokenizer.from_pretrained(base.path)
    except Exception as e:  # missing or unreadable tokenizer files
        raise TwinError(f"base {base.label}: no usable tokenizer ({e})".splitlines()[0]) from None
    gen = None
    if isinstance(base, SafetensorsDir) and (base.path / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base.path)
    return config, tok, gen or GenerationConfig.from_model_config(config)


def check_finite(t: torch.Tensor, name: str, who: str) -> None:
    # a sum is finite whenever every entry is (float32 sums of weights do not overflow): one cheap pass first
    if not t.is_floating_point() or torch.isfinite(t.sum()):
        return
    if not torch.isfinite(t).all():
        raise TwinError(f"{who}: tensor {name} contains NaN or inf values")
    raise TwinError(f"{who}: tensor {name} has values too large to merge in float32")


def check_output(out: Path, cfg: SplitConfig, force: bool, keep: Mapping[str, Path] | None = None) -> None:
    """Refuse an output that exists (without `force`), that `force` may not replace (not an artifact, see
    `check_replaceable`), or that contains one of the split's inputs: the base, an expert, or `keep` (e.g.
    {"config file": path})."""
    if (out.exists() or out.is_symlink()) and not force:
        raise TwinError(f"output {out} already exists (pass --force to replace it)")
    inputs = {"base": cfg.base, **{f"expert {e.name!r}": e.path for e in cfg.experts}, **(keep or {})}
    real = out.resolve()
    for what, path in inputs.items():
        p = Path(path).resolve()
        if p == real or real in p.parents:
            raise TwinError(f"output {out} contains the {what} {path}; write the artifact elsewhere")
    if force:
        check_replaceable(out)


def check_integer_tensor(experts: Iterable[LoraExpert | FullExpert], name: str, base_t: torch.Tensor) -> None:
    """A non-float tensor is the base's in the core and in every expert; refuse an expert whose differs."""
    for e in experts:
        if not torch.equal(e.get(name, base_t), base_t):
            raise TwinError(f"{e.label}: non-float tensor {name} differs from the base")


def task_vectors(experts: Collection[LoraExpert | FullExpert], name: str, base_t: torch.Tensor,
                 base32: torch.Tensor, device: str) -> torch.Tensor:
    """τ_i = θ_i − θ_base of tensor `name` in float32 on `device`, each expert's weights checked finite:
    -> [N, ...]. Filled one expert at a time: memory holds the base, one τ per expert."""
    tau = torch.empty((len(experts), *base_t.shape), dtype=torch.float32, device=device)  # [N, ...]
    for i, e in enumerate(experts):
        theta = e.get(name, base_t)
        check_finite(theta, name, e.label)
        tau[i] = theta.to(device=device, dtype=torch.float32)
        del theta
        tau[i] -= base32
    return tau


def exclusive_deltas(tau: torch.Tensor, core_t: torch.Tensor, base32: torch.Tensor) -> torch.Tensor:
    """d_i = θ_i − θ_core(stored) = τ_i − (θ_core − θ_base), computed in place in `tau: [N, ...]`."""
    return tau.sub_(core_t.float() - base32)


def write_exclusive(out: ArtifactWriter, name: str, shape: Sequence[int], experts: Sequence[str],
                    deltas: torch.Tensor, *, factored: bool, spec: ExclusiveSpec | ExclusiveInfo) -> None:
    """Each expert's exclusive part of tensor `name` into `out`: truncated SVD factors (rank or energy rule of
    `spec`, its SVD path, a seed per expert and tensor) of a factored weight, else the exact dense delta.
    `deltas: [N, ...]` in the order of `experts`; an expert's factors depend on its name and delta only."""
    if factored:
        out.add_factored(name, shape, {
            expert: truncated_svd(d, rank=spec.rank, energy=spec.energy, method=spec.svd,
                                  seed=tensor_seed(0, expert + name))
            for expert, d in zip(experts, deltas)})
    else:
        out.add_dense(name, shape, dict(zip(experts, deltas)))


@dataclass(frozen=True)
class _Plan:
    """What the split does to each tensor, fixed before the first one."""

    base: SafetensorsDir | GGUFFile
    experts: dict[str, LoraExpert | FullExpert]  # mix order
    method: MergeMethod
    params: dict[str, Any]
    factored: set[str]
    excluded: tuple[re.Pattern[str], ...]
    exclusive: ExclusiveSpec
    store: torch.dtype
    device: str
    stats: Callable[[str], TensorStats] | None = None  # the experts' statistics of a tensor, for data methods

    def _untouched(self, name: str) -> bool:
        """Whether every expert is a LoRA adapter that does not adapt tensor `name` (so τ_i = 0 for all)."""
        return all(isinstance(e, LoraExpert) and name not in e.loras for e in self.experts.values())

    def tensor(self, name: str, out: ArtifactWriter) -> tuple[bool, dict[str, Any]]:
        """Split tensor `name` into `out`; -> (excluded from the merge: its core is the base's, the method's
        report on the tensor)."""
        base_t = self.base.get(name)
        check_finite(base_t, name, f"base {self.base.label}")
        if not base_t.is_floating_point():
            check_integer_tensor(self.experts.values(), name, base_t)
            out.add_core(name, base_t)
            return False, {}
        if self.stats is None and base_t.dtype == self.store and name not in self.factored and self._untouched(name):
            # LoRA experts that leave this tensor as the base (embeddings, norms): every τ_i is zero, so the
            # core is the base (stored as it is: same dtype) and no expert has a delta; no [N, ...] stack is
            # built (the largest tensors are these, so peak memory no longer grows with N for LoRA experts)
            out.add_core(name, base_t.to(self.store))
            out.add_unchanged(name, base_t.shape)
            return any(r.search(name) for r in self.excluded), {}
        base32 = base_t.to(device=self.device, dtype=torch.float32)
        tau = task_vectors(self.experts.values(), name, base_t, base32, self.device)  # [N, ...]
        excluded = any(r.search(name) for r in self.excluded)
        report: dict[str, Any] = {}
        if excluded:
            merged = torch.zeros_like(base32)
        else:
            stats = self.stats(name) if self.stats is not None else None
            result = merge_tensor(self.method, self.params, name, tau, stats)
            merged, report = result.tau, result.report
            del stats, result
        core_t = (base32 + merged).to(self.store)
        out.add_core(name, core_t)
        del merged
        write_exclusive(out, name, base_t.shape, list(self.experts), exclusive_deltas(tau, core_t, base32),
                        factored=name in self.factored, spec=self.exclusive)
        return excluded, report


def read_calibrations(cfg: SplitConfig, tokenizer: Any, config: Any) -> dict[str, Calibration]:
    """Every expert's calibration data, read and checked (before the split writes anything), in mix order."""
    context = getattr(config, "max_position_embeddings", None)
    out = {}
    for e in cfg.experts:
        c = e.calibration
        if c is None:  # the config's own check names every expert without data; this is its last line
            raise TwinError(f"expert {e.name!r} has no calibration data, which shared.method {cfg.shared.method!r} "
                            "needs")
        out[e.name] = load_calibration(c.data, tokenizer, samples=c.samples, max_tokens=c.max_tokens,
                                       context=context, expert=e.name, batch_size=c.batch_size)
    return out


def statistics_record(method: MergeMethod, plan: StatisticsPlan, costs: list[ExpertCost],
                      reports: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The content of ARTIFACT/statistics.json: what the statistics pass cost and what the merge reported."""
    return {
        "format": STATISTICS_FORMAT,
        "method": method.name,
        "statistics": sorted(plan.kinds),
        "linear_weights": len(plan.linear),
        "experts": [asdict(c) for c in costs],
        "total": {"seconds": round(sum(c.seconds for c in costs), 3), "bytes": sum(c.bytes for c in costs),
                  "peak_rss_bytes": max((c.peak_rss_bytes or 0 for c in costs), default=0) or None},
        "tensors": dict(sorted(reports.items())),
    }


def split(cfg: SplitConfig, out: Path, *, force: bool = False, device: str = "cpu",
          progress: Callable[[int], Progress] | None = None, keep: Mapping[str, Path] | None = None) -> Manifest:
    """Split `cfg.base` + `cfg.experts` into a twinrt/1 artifact at `out` (written atomically).

    `force` replaces an existing artifact (or empty directory) at `out`, nothing else; `out` may not contain
    an input (base, experts, or the paths of `keep`, by what they are). `progress(total)` may return a
    callback called with each tensor name as it is done.
    """
    out = Path(out)
    check_output(out, cfg, force, keep)
    base = open_base(cfg.base)
    experts = {e.name: open_expert(e.path, e.name, base) for e in cfg.experts}
    for e in experts.values():
        check_compatible(base, base.config, e)
    method = get_method(cfg.shared.method)
    method.check(cfg.shared.params, len(experts))
    hf_config = _hf_config(base)
    factored = _factored_weights(base, hf_config, cfg.exclusive)
    plan = _Plan(base, experts, method, cfg.shared.params, factored,
                 tuple(re.compile(p) for p in cfg.shared.exclude), cfg.exclusive, DTYPES[cfg.dtype], device)
    core_files = _core_files(base, hf_config, cfg.dtype)
    kinds = method.statistics(cfg.shared.params)
    calibrations = read_calibrations(cfg, core_files[1], hf_config) if kinds else {}
    names = base.names()

    with atomic_dir(out, force=force) as tmp:
        writer = ArtifactWriter(tmp, list(experts), plan.store)
        writer.save_core(*core_files)
        if kinds:
            work = tmp / ".statistics"  # inside the temp dir: removed with it on any failure
            work.mkdir()
            stats_plan = StatisticsPlan(kinds, tuple(sorted(factored)))
            model = load_model(base, hf_config, device)
            costs = collect_statistics(model, calibrations, stats_plan, work,
                                       lambda e: expert_tensors(base, experts[e]), progress)
            del model
            plan = replace(plan, stats=StatisticsFiles([work / f"{e}.safetensors" for e in experts]))
        tick = progress(len(names)) if progress else None
        excluded, reports = [], {}
        for name in names:
            was_excluded, report = plan.tensor(name, writer)
            if was_excluded:
                excluded.append(name)
            if report:
                reports[name] = report
            if tick:
                tick(name)
        if kinds:
            plan = replace(plan, stats=None)  # closes the statistics files before they go
            shutil.rmtree(work)
            record = statistics_record(method, stats_plan, costs, reports)
            (tmp / STATISTICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        manifest = writer.finish(
            base=BaseInfo(source=str(cfg.base), kind="gguf" if isinstance(base, GGUFFile) else "hf",
                          fingerprint=base.fingerprint(),
                          architecture=(base.config.get("architectures") or [None])[0],
                          model_type=base.config.get("model_type")),
            shared=SharedInfo(method=method.name, params=cfg.shared.params, excluded=excluded,
                              experts=list(experts)),
            exclusive=ExclusiveInfo(rank=cfg.exclusive.rank, energy=cfg.exclusive.energy, svd=cfg.exclusive.svd,
                                    dtype=cfg.dtype),
            experts=[ExpertInfo(name=s.name, source=str(s.path), kind=experts[s.name].kind,
                                fingerprint=experts[s.name].fingerprint()) for s in cfg.experts],
        )
    if cfg.statics:  # each its own atomic update of the finished artifact, from the same sources
        from twinrt.split.static import add_static

        for st in cfg.statics:
            manifest = add_static(out, st.label, st.method, st.params, device=device)
    return manifest
