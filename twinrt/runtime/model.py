"""TwinModel: the shared core with every expert's factors attached, mixed per row (Contract 3)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinrt.artifact import Artifact
from twinrt.errors import TwinError
from twinrt.runtime.mixing import MixEmbedding, MixLinear, MixScaleNorm, MixState

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MixLike = torch.Tensor | Sequence[Mapping[str, float]] | None


@dataclass(frozen=True)
class Plan:
    """How a batch will be run, and why (see TwinModel.plan)."""

    path: str  # "core" | "factored" | "grouped" | "materialized"
    reason: str
    rows: int
    active_experts: tuple[str, ...]
    base_flops_per_token: int
    extra_flops_per_token: int  # the factored path's two skinny GEMMs, summed over layers
    materialize_flops: int  # building W' once (0 when cached)
    materialize_bytes: int
    tokens: int

    @property
    def flop_limit_ratio(self) -> float:
        """1 / (1 + extra/base): the best throughput ratio to the core the factored path can reach."""
        return 1.0 / (1.0 + self.extra_flops_per_token / max(self.base_flops_per_token, 1))

    def __str__(self) -> str:
        return (f"{self.path}: {self.reason} | rows={self.rows} active={list(self.active_experts)} "
                f"base={self.base_flops_per_token / 1e6:.1f} MFLOP/tok extra={self.extra_flops_per_token / 1e6:.2f} "
                f"MFLOP/tok (limit {self.flop_limit_ratio:.3f}x) materialize={self.materialize_flops / 1e9:.2f} GFLOP "
                f"{self.materialize_bytes / 2**20:.0f} MiB tokens={self.tokens}")


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise TwinError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}") from None


class TwinModel:
    """The core model whose linear layers mix the experts' factors per row.

    >>> tm = TwinModel.from_artifact("ARTIFACT", device="cpu", dtype="float32")
    >>> logits = tm.forward(input_ids, attention_mask, mix=w)      # w: [B, N]; None = core only
    >>> texts = tm.generate(prompts, mix=[{"math": 1.0}], max_new_tokens=32)
    """

    def __init__(self, artifact: Artifact, model: nn.Module, tokenizer: Any, device: torch.device,
                 dtype: torch.dtype, materialize_budget_bytes: int) -> None:
        self.artifact = artifact
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.experts: list[str] = list(artifact.experts)
        self.state = MixState(len(self.experts))
        self.materialize_budget_bytes = materialize_budget_bytes
        # When the grouped path pays (benchmarks/bench_fusion.py times both paths on top-1 mixes): at most
        # `grouped_density` of the (row, active expert) pairs have weight, each active expert gets at least
        # `grouped_min_tokens` tokens of this forward on average (so its GEMMs are not launch-bound: prefill
        # yes, decode of a few rows no), and the active experts' mean rank is at least `grouped_min_rank`
        # (at rank 16 the skipped FLOPs are too few to pay for the gathers on a CPU).
        self.grouped_density = 0.5
        self.grouped_min_tokens = 64
        self.grouped_min_rank = 32
        self._materialized: OrderedDict[tuple, int] = OrderedDict()  # mix key -> bytes, LRU order
        self._costs: tuple | None = None  # see _expert_costs
        self.mix_linears: list[MixLinear] = []
        self._attach()
        self.config = model.config

    # ---- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_artifact(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                      *, verify: bool = True, materialize_budget_mib: int = 1024) -> TwinModel:
        """Load the core with transformers and attach every expert's factors and dense deltas."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        art = Artifact.open(path, verify=verify)
        torch_dtype = _dtype(dtype)
        dev = torch.device(device)
        model = AutoModelForCausalLM.from_pretrained(art.core_dir, dtype=torch_dtype).to(dev).eval()
        tok = AutoTokenizer.from_pretrained(art.core_dir)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return cls(art, model, tok, dev, torch_dtype, materialize_budget_mib * 2**20)

    def _attach(self) -> None:
        art, m = self.artifact, self.model
        dt, dev = self.dtype, self.device
        factors: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        dense: dict[str, dict[int, torch.Tensor]] = {}
        for i, name in enumerate(self.experts):
            for w, (a, b) in art.load_factors(name, dtype=dt).items():
                factors.setdefault(w, {})[i] = (a.to(dev), b.to(dev))
            for w, d in art.load_dense(name, dtype=dt).items():
                dense.setdefault(w, {})[i] = d.to(dev)
        modules = dict(m.named_modules())
        tied_head = None
        if getattr(m.config, "tie_word_embeddings", False):
            emb, head = m.get_input_embeddings(), m.get_output_embeddings()
            if head is not None and head.weight is emb.weight:
                emb_name = next(n for n, mod in modules.items() if mod is emb)
                tied_head = (next(n for n, mod in modules.items() if mod is head), f"{emb_name}.weight")
        by_module: dict[str, dict[str, Any]] = {}
        for w, per in factors.items():
            by_module.setdefault(w.rsplit(".", 1)[0], {})["factors"] = per
        for w, per in dense.items():
            mod, attr = w.rsplit(".", 1)
            by_module.setdefault(mod, {})[attr] = per
        if tied_head and tied_head[1] in dense:  # the tied lm_head moves with the embedding table
            by_module.setdefault(tied_head[0], {})["weight"] = dense[tied_head[1]]
        for mod_name, parts in by_module.items():
            mod = modules.get(mod_name)
            if mod is None:
                raise TwinError(f"artifact has deltas for {mod_name}, which the core model does not have")
            self._set(mod_name, self._wrap(mod_name, mod, parts))

    def _wrap(self, name: str, mod: nn.Module, parts: dict[str, Any]) -> nn.Module:
        st = self.state
        if isinstance(mod, nn.Linear):
            unknown = set(parts) - {"factors", "weight", "bias"}
            if not unknown:
                wrapped = MixLinear(mod, st, parts.get("factors", {}), parts.get("weight"), parts.get("bias"))
                self.mix_linears.append(wrapped)
                return wrapped
        elif isinstance(mod, nn.Embedding) and set(parts) == {"weight"}:
            return MixEmbedding(mod, st, parts["weight"])
        elif "norm" in type(mod).__name__.lower() and set(parts) == {"weight"} and mod.weight.dim() == 1:
            return MixScaleNorm(mod, st, parts["weight"])
        raise TwinError(f"artifact has deltas of {sorted(parts)} for {name} ({type(mod).__name__}), which twinrt "
                        "cannot mix per row")

    def _set(self, name: str, new: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, new)

    # ---- mixes -----------------------------------------------------------------------------------------------

    def parse_mix(self, mix: MixLike, batch: int) -> torch.Tensor | None:
        """Validate a mix: a [B, N] tensor or B dicts {expert: weight}. Returns float32 [B, N] or None."""
        if mix is None:
            return None
        n = len(self.experts)
        if isinstance(mix, torch.Tensor):
            w = mix.detach().to("cpu", torch.float32)
            if w.dim() != 2 or w.shape != (batch, n):
                raise ValueError(f"mix must have shape [{batch}, {n}] (batch, experts {self.experts}), "
                                 f"got {list(mix.shape)}")
        else:
            rows = list(mix)
            if len(rows) != batch:
                raise ValueError(f"mix has {len(rows)} rows for a batch of {batch}")
            w = torch.zeros(batch, n)
            for b, row in enumerate(rows):
                if not isinstance(row, Mapping):
                    raise ValueError(f"mix row {b} must be a dict {{expert: weight}}, got {type(row).__name__}")
                for name, value in row.items():
                    if name not in self.experts:
                        raise ValueError(f"mix row {b}: unknown expert {name!r}; experts are {self.experts}")
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        raise ValueError(f"mix row {b}: weight of {name!r} must be a number, got {value!r}")
                    w[b, self.experts.index(name)] = float(value)
        if not torch.isfinite(w).all():
            raise ValueError("mix has NaN or infinite weights")
        if (w < 0).any():
            b, e = (w < 0).nonzero()[0].tolist()
            raise ValueError(f"mix row {b}: weight of {self.experts[e]!r} is negative ({w[b, e].item()})")
        return w

    @staticmethod
    def mix_key(row: torch.Tensor) -> tuple:
        return tuple(round(float(v), 7) for v in row)

    def _expert_costs(self) -> tuple[int, list[int], list[int], list[int], list[int], int]:
        """Per-expert cost terms, computed once (plan() runs every decode step, so no per-call module walks).

        -> (base FLOPs/token, factored FLOPs/token per expert, dense-delta FLOPs/token per expert,
            materialize FLOPs per expert, rank summed over mixing layers per expert, bytes of all W')
        """
        if self._costs is None:
            n = len(self.experts)
            fac, dense, mat, rank = [0] * n, [0] * n, [0] * n, [0] * n
            for layer in self.mix_linears:
                i, o = layer.in_features, layer.out_features
                for e, rk in zip(layer.experts, layer.ranks):
                    fac[e] += 2 * rk * (i + o)
                    mat[e] += 2 * rk * i * o
                    rank[e] += rk
                for e in layer.dense:
                    dense[e] += 2 * i * o
                    mat[e] += 2 * i * o
            base = sum(2 * m.in_features * m.out_features for m in self.model.modules() if isinstance(m, nn.Linear))
            mat_bytes = sum(layer.base.weight.numel() for layer in self.mix_linears) * self.dtype.itemsize
            self._costs = (base, fac, dense, mat, rank, mat_bytes)
        return self._costs

    def _flops(self, active: tuple[int, ...], share: dict[int, float] | None = None) -> tuple[int, int, int]:
        """(base, extra factored, materialize) FLOPs: per token for the first two, once for the last.

        `share`: the fraction of rows each expert's factors run on (grouped path); default all rows.
        """
        base, fac, dense, mat, _, _ = self._expert_costs()
        extra = sum(round(fac[e] * (1.0 if share is None else share[e])) + dense[e] for e in active)
        return base, extra, sum(mat[e] for e in active)

    def plan(self, mix: torch.Tensor | None, tokens: int, step_tokens: int | None = None) -> Plan:
        """Choose the path for a batch with this mix that will process about `tokens` tokens in all.

        core: no expert has weight. materialized: every row shares one mix, and building W' costs less than
        the factored GEMMs over `tokens` (or W' is cached) and fits the memory budget. grouped: rows have
        different mixes, at most `grouped_density` of the (row, active expert) pairs have weight (top-k
        routing), and this forward (`step_tokens` tokens) gives each active expert enough tokens at a high
        enough rank that running each expert's GEMMs on its own rows only beats the concatenated GEMMs.
        factored: otherwise.
        """
        rows = 0 if mix is None else mix.shape[0]
        active = () if mix is None else tuple(int(i) for i in torch.nonzero((mix != 0).any(0)).flatten())
        base, extra, mat = self._flops(active)
        mat_bytes = self._expert_costs()[5]
        names = tuple(self.experts[i] for i in active)
        mk = lambda path, why, mf=mat: Plan(path, why, rows, names, base, extra if path != "core" else 0, mf,  # noqa: E731
                                            mat_bytes, tokens)
        if not active:
            return mk("core", "no expert has weight", 0)
        if not bool((mix == mix[0]).all()):
            nz = (mix[:, list(active)] != 0).float()  # [B, A]
            density = float(nz.mean())
            rank = self._expert_costs()[4]
            mean_rank = sum(rank[e] for e in active) / max(len(self.mix_linears) * len(active), 1)
            if (rows > 1 and len(active) > 1 and density <= self.grouped_density and step_tokens is not None
                    and step_tokens * density >= self.grouped_min_tokens and mean_rank >= self.grouped_min_rank):
                share = nz.mean(0).tolist()  # fraction of rows using each active expert
                extra_g = self._flops(active, share=dict(zip(active, share)))[1]
                return Plan("grouped", f"rows have different mixes; {density:.0%} of (row, expert) pairs have "
                            f"weight: GEMMs per expert on its rows", rows, names, base, extra_g, mat, mat_bytes,
                            tokens)
            return mk("factored", "rows have different mixes")
        if self.mix_key(mix[0]) in self._materialized:
            return mk("materialized", "all rows share a mix whose W' is cached", 0)
        if mat_bytes > self.materialize_budget_bytes:
            return mk("factored", "W' would not fit the materialize budget")
        if tokens * extra <= mat:
            return mk("factored", f"building W' costs more than {tokens} tokens of factored GEMMs")
        return mk("materialized", "all rows share a mix; building W' once is cheaper than the factored GEMMs")

    def materialize(self, row: torch.Tensor) -> tuple:
        """Build and cache W' = W + Σ_n w_n (B_n A_n + D_n) for every mixing layer; LRU within the budget."""
        key = self.mix_key(row)
        if key in self._materialized:
            self._materialized.move_to_end(key)
            return key
        nbytes = 0
        with torch.no_grad():
            for layer in self.mix_linears:
                w = (layer.base.weight.float() + layer.delta_weight(row.to(self.device))).to(self.dtype)
                layer.materialized[key] = w
                nbytes += w.numel() * w.element_size()
        self._materialized[key] = nbytes
        while sum(self._materialized.values()) > self.materialize_budget_bytes and len(self._materialized) > 1:
            old, _ = self._materialized.popitem(last=False)
            for layer in self.mix_linears:
                layer.materialized.pop(old, None)
        return key

    def set_mix(self, mix: torch.Tensor | None, tokens: int = 1, allow_materialize: bool = True,
                step_tokens: int | None = None) -> Plan:
        """Make every mixing layer use `mix` ([B, N], validated) for the next forward pass(es).

        `tokens`: what the batch will process in all (for materializing); `step_tokens`: this forward's.
        """
        plan = self.plan(mix, tokens, step_tokens)
        key = None
        if plan.path == "materialized" and allow_materialize:
            key = self.materialize(mix[0])
        if plan.path == "core":
            self.state.set(None)
        else:
            self.state.set(mix.to(self.device), key, grouped=plan.path == "grouped")
        return plan

    # ---- running ---------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, mix: MixLike = None,
                *, materialize: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] of the mixed model; each row uses its own mix row (None = core)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {list(input_ids.shape)}")
        w = self.parse_mix(mix, input_ids.shape[0])
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.set_mix(w, tokens=input_ids.numel(), allow_materialize=materialize, step_tokens=input_ids.numel())
        try:
            with torch.no_grad():
                return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).logits
        finally:
            self.state.set(None)

    def generate(self, prompts: Sequence[str | Sequence[Mapping[str, str]]], mix: MixLike = None, *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None, max_batch: int = 64,
                 materialize: bool = True) -> list[str]:
        """Generate a completion per prompt (a string, or chat messages rendered with the chat template).

        Each row keeps its own mix for the whole request; greedy when temperature == 0.
        """
        from twinrt.runtime.engine import Engine, SamplingParams

        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        w = self.parse_mix(mix, len(prompts))
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=tuple(stop or ()), seed=seed)
        engine = Engine(self, max_batch=max_batch, materialize=materialize)
        reqs = [engine.add(p, None if w is None else w[i], params) for i, p in enumerate(prompts)]
        engine.run_until_done()
        return [r.text for r in reqs]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __repr__(self) -> str:
        ranks = [sum(layer.ranks) for layer in self.mix_linears]
        return (f"TwinModel(experts={self.experts}, mixing_layers={len(self.mix_linears)}, "
                f"mean_concat_rank={sum(ranks) / max(len(ranks), 1):.1f}, dtype={self.dtype}, device={self.device})")

