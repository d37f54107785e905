"""The offline split (Contract 1): one pass over tensor names, one tensor per expert in memory at a time.

For every tensor name: τ_i = θ_i − θ_base for all experts, θ_core = θ_base + merge(τ) (stored in the
artifact's dtype), and each expert's exclusive part d_i = θ_i − θ_core: truncated SVD factors for the
decoder's linear weights, exact dense deltas for everything else (norms, biases, embeddings).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinrt import __version__
from twinrt.artifact.manifest import (
    FORMAT,
    BaseInfo,
    DenseInfo,
    ExclusiveInfo,
    ExpertInfo,
    ExpertSize,
    FactorInfo,
    Manifest,
    SharedInfo,
    Sizes,
    TensorInfo,
)
from twinrt.artifact.store import atomic_dir, check_replaceable, checksum_tree, write_manifest
from twinrt.artifact.stwriter import SafetensorsWriter
from twinrt.config import SplitConfig
from twinrt.errors import TwinError
from twinrt.merge import get_method
from twinrt.merge.methods import dare_keep_masks
from twinrt.sources.checkpoint import GGUFFile, SafetensorsDir, open_base
from twinrt.sources.experts import check_compatible, open_expert
from twinrt.split.svd import truncated_svd

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_PREFIX = "base_model.model."

Progress = Callable[[str], None]  # called once per tensor name, after it is done


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


def _write_core_extras(base: SafetensorsDir | GGUFFile, config: Any, core: Path, dtype: str) -> None:
    """config.json, generation_config.json and the tokenizer, so that transformers loads core/ as is."""
    from transformers import AutoTokenizer, GenerationConfig

    config.dtype = dtype
    config.save_pretrained(core)
    try:
        if isinstance(base, GGUFFile):
            tok = AutoTokenizer.from_pretrained(base.path.parent, gguf_file=base.path.name)
        else:
            tok = AutoTokenizer.from_pretrained(base.path)
    except Exception as e:  # missing or unreadable tokenizer files
        raise TwinError(f"base {base.label}: no usable tokenizer ({e})".splitlines()[0]) from None
    tok.save_pretrained(core)
    gen = None
    if isinstance(base, SafetensorsDir) and (base.path / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base.path)
    (gen or GenerationConfig.from_model_config(config)).save_pretrained(core)


def tensor_seed(seed: int, name: str) -> int:
    # per-tensor seeds make random merges independent of the order tensors are processed in
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _finite(t: torch.Tensor, name: str, who: str) -> None:
    # a sum is finite whenever every entry is (float32 sums of weights do not overflow): one cheap pass first
    if not t.is_floating_point() or torch.isfinite(t.sum()):
        return
    if not torch.isfinite(t).all():
        raise TwinError(f"{who}: tensor {name} contains NaN or inf values")
    raise TwinError(f"{who}: tensor {name} has values too large to merge in float32")


@dataclass
class _ExpertOut:
    factors: SafetensorsWriter
    dense: SafetensorsWriter
    ranks: dict[str, int] = field(default_factory=dict)  # module -> rank (> 0)


def _adapter_config(ranks: dict[str, int]) -> dict[str, Any]:
    from peft import LoraConfig

    r = max(ranks.values(), default=1)
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks) or None, rank_pattern=pattern,
                     alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     inference_mode=True)
    return cfg.to_dict()


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
    experts = [open_expert(e.path, e.name, base) for e in cfg.experts]
    for e in experts:
        check_compatible(base, base.config, e)
    method = get_method(cfg.shared.method)
    params = cfg.shared.resolved_params()
    if method.name == "consensus" and params["k"] > len(experts):
        raise TwinError(f"shared.k={params['k']} needs at least that many experts (have {len(experts)})")
    hf_config = _hf_config(base)
    names = base.names()
    linear = decoder_linear_weights(hf_config)
    unknown = sorted(linear - set(names))
    if unknown:
        raise TwinError(f"base {base.label}: its config's architecture has weights the checkpoint lacks, "
                        f"e.g. {unknown[0]}")
    ex = cfg.exclusive
    widest = max((min(base.meta(n).shape) for n in linear), default=0)
    if ex.rank is not None and ex.rank > widest:
        raise TwinError(f"exclusive.rank {ex.rank} is larger than every factored matrix (the largest full rank "
                        f"is {widest}); narrower matrices are clamped, but this rank stores more than dense")
    store = DTYPES[cfg.dtype]
    excluded_re = [re.compile(p) for p in cfg.shared.exclude]
    tick = progress(len(names)) if progress else None

    with atomic_dir(out, force=force) as tmp:
        core = tmp / "core"
        core.mkdir()
        _write_core_extras(base, hf_config, core, cfg.dtype)
        core_w = SafetensorsWriter(core, "model")
        outs = {}
        for e in cfg.experts:
            d = tmp / "experts" / e.name
            d.mkdir(parents=True)
            outs[e.name] = _ExpertOut(SafetensorsWriter(d, "adapter_model", max_shard_bytes=1 << 62),
                                      SafetensorsWriter(d, "dense", max_shard_bytes=1 << 62))
        tensors: dict[str, TensorInfo] = {}
        excluded: list[str] = []
        full_bytes = 0
        for name in names:
            base_t = base.get(name)
            _finite(base_t, name, f"base {base.label}")
            full_bytes += base_t.numel() * (store.itemsize if base_t.is_floating_point() else base_t.element_size())
            if not base_t.is_floating_point():
                for e in experts:
                    if not torch.equal(e.get(name, base_t), base_t):
                        raise TwinError(f"{e.label}: non-float tensor {name} differs from the base")
                core_w.add(name, base_t)
                if tick:
                    tick(name)
                continue
            base32 = base_t.to(device=device, dtype=torch.float32)
            # τ filled one expert at a time: memory holds the base, one τ per expert and the merged result
            tau = torch.empty((len(experts), *base_t.shape), dtype=torch.float32, device=device)  # [N, ...]
            for i, e in enumerate(experts):
                theta = e.get(name, base_t)
                _finite(theta, name, e.label)
                tau[i] = theta.to(device=device, dtype=torch.float32)
                del theta
                tau[i] -= base32
            if any(r.search(name) for r in excluded_re):
                excluded.append(name)
                merged = torch.zeros_like(base32)
            else:
                keep = None
                if method.random:
                    gen = torch.Generator().manual_seed(tensor_seed(params["seed"], name))
                    keep = dare_keep_masks(tau.shape[1:], len(experts), params["density"], gen).to(tau.device)
                merged = method.merge(tau, params, keep)
            core_t = (base32 + merged).to(store)
            core_w.add(name, core_t)
            del merged
            deltas = tau.sub_(core_t.float() - base32)  # in place: d_i = θ_i − θ_core(stored) = τ_i − (θ_core − θ_base)
            per_expert: dict[str, FactorInfo | DenseInfo] = {}
            if name in linear:
                for spec, d in zip(cfg.experts, deltas):
                    f = truncated_svd(d, rank=ex.rank, energy=ex.energy, method=ex.svd,
                                      seed=tensor_seed(0, spec.name + name))
                    per_expert[spec.name] = FactorInfo(rank=f.rank, energy=round(f.energy, 6), path=f.path)
                    if f.rank:
                        module = name.removesuffix(".weight")
                        o = outs[spec.name]
                        o.factors.add(f"{LORA_PREFIX}{module}.lora_A.weight", f.a.to(store))
                        o.factors.add(f"{LORA_PREFIX}{module}.lora_B.weight", f.b.to(store))
                        o.ranks[module] = f.rank
                role = "factored"
            else:
                for spec, d in zip(cfg.experts, deltas):
                    norm = float(torch.linalg.vector_norm(d, dtype=torch.float64))
                    per_expert[spec.name] = DenseInfo(stored=norm > 0.0, norm=norm)
                    if norm > 0.0:
                        outs[spec.name].dense.add(name, d.to(store))
                role = "dense"
            tensors[name] = TensorInfo(shape=list(base_t.shape), role=role, experts=per_expert)
            if tick:
                tick(name)
        core_w.close()
        sizes = {}
        for spec in cfg.experts:
            o = outs[spec.name]
            o.factors.close()
            if o.dense.names:
                o.dense.close()
            d = tmp / "experts" / spec.name
            (d / "adapter_config.json").write_text(json.dumps(_adapter_config(o.ranks), indent=2, default=list))
            sizes[spec.name] = ExpertSize(factors=o.factors.total_bytes, dense=o.dense.total_bytes)
        manifest = Manifest(
            format=FORMAT, twinrt_version=__version__,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            base=BaseInfo(source=str(cfg.base), kind="gguf" if isinstance(base, GGUFFile) else "hf",
                          fingerprint=base.fingerprint(),
                          architecture=(base.config.get("architectures") or [None])[0],
                          model_type=base.config.get("model_type")),
            shared=SharedInfo(method=method.name, params=params, excluded=excluded),
            exclusive=ExclusiveInfo(rank=ex.rank, energy=ex.energy, svd=ex.svd, dtype=cfg.dtype),
            experts=[ExpertInfo(name=s.name, source=str(s.path), kind=e.kind, fingerprint=e.fingerprint())
                     for s, e in zip(cfg.experts, experts)],
            tensors=tensors,
            sizes=Sizes(core=core_w.total_bytes, full_expert=full_bytes, experts=sizes),
            files=checksum_tree(tmp),
        )
        write_manifest(tmp, manifest)
    return manifest

