"""TwinModel: the shared core with every expert's factors attached, mixed per row (Contract 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinrt.artifact import Artifact
from twinrt.dtypes import torch_dtype
from twinrt.errors import TwinError
from twinrt.runtime.engine import Engine
from twinrt.runtime.materialized import MaterializedWeights, MixKey
from twinrt.runtime.mixing import MixEmbedding, MixLinear, MixScaleNorm, MixState, scales_affinely
from twinrt.runtime.planning import ExpertCosts, MixPolicy, Plan, plan_batch
from twinrt.runtime.request import SamplingParams
from twinrt.runtime.runner import Runner

MixLike = torch.Tensor | Sequence[Mapping[str, float]] | None


def _columns(art: Artifact, dev: torch.device, dt: torch.dtype) -> tuple[dict, dict]:
    """Every column's (experts', then static merges') factors and dense deltas, on the device."""
    columns = [*art.experts, *art.statics]
    factors = {c: {w: (a.to(dev), b.to(dev)) for w, (a, b) in art.load_factors(c, dtype=dt).items()}
               for c in columns}
    dense = {c: {w: d.to(dev) for w, d in art.load_dense(c, dtype=dt).items()} for c in columns}
    return factors, dense


def core_files(art: Artifact) -> dict[str, str]:
    """The sha256 of every core file: two artifacts with equal ones share a core."""
    return {rel: digest for rel, digest in art.manifest.files.items() if rel.startswith("core/")}


class TwinModel(Runner):
    """The core model whose linear layers mix the experts' factors per row.

    >>> tm = TwinModel.from_artifact("ARTIFACT", device="cpu", dtype="float32")
    >>> logits = tm.forward(input_ids, attention_mask, mix=w)      # w: [B, N]; None = core only
    >>> texts = tm.generate(prompts, mix=[{"math": 1.0}], max_new_tokens=32)
    >>> tm.forward(input_ids, mix=[{"static:ties": 1.0}])             # a static merge stored in the artifact
    """

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device, dtype: torch.dtype, *,
                 experts: Sequence[str], statics: Sequence[str] = (),
                 factors: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                 dense: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                 materialize_budget_bytes: int = 2**30, policy: MixPolicy | None = None,
                 artifact: Artifact | None = None) -> None:
        """`model` (an HF causal LM on `device`, in `dtype`) with each column's factors ({weight name: (A [r, in],
        B [out, r])}) and dense deltas ({weight name: D}) attached, the columns being `experts` then `statics`
        ("static:<label>"). `from_artifact` is the usual way in; this one serves models built in memory."""
        self.artifact = artifact
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.experts: list[str] = list(experts)
        self.statics: list[str] = list(statics)  # "static:<label>": static merges, one column each
        self.columns: list[str] = self.experts + self.statics  # a mix's columns: the experts, then the statics
        self.state = MixState(len(self.columns), device=device)
        self.policy = policy or MixPolicy()  # which mixing kernels the planner may pick, at what cost
        self.mix_linears: list[MixLinear] = []
        self._attach(factors, dense or {})
        self.config = model.config
        self.costs = ExpertCosts.of(model, self.mix_linears, len(self.columns), dtype)
        self.materialized = MaterializedWeights(self.mix_linears, dtype, device, materialize_budget_bytes)

    # ---- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_artifact(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                      *, verify: bool = True, materialize_budget_mib: int = 1024,
                      policy: MixPolicy | None = None) -> TwinModel:
        """Load the core with transformers and attach every expert's (and static merge's) factors and deltas."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        art = Artifact.open(path, verify=verify)
        dt = torch_dtype(dtype)
        dev = torch.device(device)
        model = AutoModelForCausalLM.from_pretrained(art.core_dir, dtype=dt).to(dev).eval()
        tok = AutoTokenizer.from_pretrained(art.core_dir)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        factors, dense = _columns(art, dev, dt)
        return cls(model, tok, dev, dt, experts=art.experts, statics=art.statics, factors=factors, dense=dense,
                   materialize_budget_bytes=materialize_budget_mib * 2**20, policy=policy, artifact=art)

    def reloaded(self, path: str | Path | None = None, *, verify: bool = True) -> TwinModel:
        """A TwinModel of the artifact at `path` (default: this one's, read again, e.g. after `twinrt add`) on
        this one's core: its weights are shared, not loaded or copied, and only the experts' factors are read.
        This model is left as it is (a server finishes its running requests on it). Raises TwinError when the
        artifact's core is not this one's (`add` and `remove` never change it; a new split does)."""
        if path is None and self.artifact is None:
            raise TwinError("this TwinModel was not loaded from an artifact: name the artifact to reload")
        art = Artifact.open(path if path is not None else self.artifact.path, verify=verify)
        if self.artifact is not None and core_files(art) != core_files(self.artifact):
            raise TwinError(f"{art.path}: its core is not the one this model serves (a new split?): load it anew")
        factors, dense = _columns(art, self.device, self.dtype)
        return TwinModel(self.core_copy(), self.tokenizer, self.device, self.dtype, experts=art.experts,
                         statics=art.statics, factors=factors, dense=dense,
                         materialize_budget_bytes=self.materialized.budget_bytes, policy=self.policy, artifact=art)

    def core_copy(self) -> nn.Module:
        """The core model without the mixing layers, sharing every parameter and buffer with this one (nothing of
        them is copied): each mixing layer's place holds a copy of its base module, and nothing of the mixing
        layers' own state (factors, caches, the mix) is visited, so a serving thread may run this model meanwhile."""
        memo: dict[int, Any] = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        for mod in self.model.modules():
            if isinstance(mod, (MixLinear, MixEmbedding, MixScaleNorm)):
                memo[id(mod)] = deepcopy(mod.base, memo)
        return deepcopy(self.model, memo)

    def _attach(self, by_column_factors: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                by_column_dense: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        m = self.model
        unknown = (set(by_column_factors) | set(by_column_dense)) - set(self.columns)
        if unknown:
            raise TwinError(f"factors or deltas for {sorted(unknown)}, which are not columns {self.columns}")
        factors: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        dense: dict[str, dict[int, torch.Tensor]] = {}
        for i, name in enumerate(self.columns):
            for w, ab in by_column_factors.get(name, {}).items():
                factors.setdefault(w, {})[i] = ab
            for w, d in by_column_dense.get(name, {}).items():
                dense.setdefault(w, {})[i] = d
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
        elif set(parts) == {"weight"} and scales_affinely(mod):
            return MixScaleNorm(mod, st, parts["weight"])
        raise TwinError(f"artifact has deltas of {sorted(parts)} for {name} ({type(mod).__name__}), which twinrt "
                        "cannot mix per row")

    def _set(self, name: str, new: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, new)

    # ---- mixes -----------------------------------------------------------------------------------------------

    def parse_mix(self, mix: MixLike, batch: int) -> torch.Tensor | None:
        """Validate a mix: a [B, N] tensor over the experts (or [B, N + S] over every column, the S static merges
        last), or B dicts {expert or "static:<label>": weight}. Returns float32 [B, N + S] or None.

        A row that gives a static merge weight gives it weight 1 and nothing else: `static:<label>` is that
        model, not a direction to mix."""
        if mix is None:
            return None
        n, width = len(self.experts), len(self.columns)
        if isinstance(mix, torch.Tensor):
            w = mix.detach().to("cpu", torch.float32)
            if w.dim() != 2 or w.shape[0] != batch or w.shape[1] not in (n, width):
                cols = f"{n}] (batch, experts {self.experts})" + (f" or [{batch}, {width}] (with the static "
                                                                   f"merges {self.statics})" if self.statics else "")
                raise ValueError(f"mix must have shape [{batch}, {cols}, got {list(mix.shape)}")
            if w.shape[1] < width:
                w = torch.cat([w, w.new_zeros(batch, width - w.shape[1])], dim=1)
        else:
            rows = list(mix)
            if len(rows) != batch:
                raise ValueError(f"mix has {len(rows)} rows for a batch of {batch}")
            w = torch.zeros(batch, width)
            for b, row in enumerate(rows):
                if not isinstance(row, Mapping):
                    raise ValueError(f"mix row {b} must be a dict {{expert: weight}}, got {type(row).__name__}")
                for name, value in row.items():
                    if name not in self.columns:
                        raise ValueError(f"mix row {b}: unknown expert {name!r}; experts are {self.experts}"
                                         + (f", static merges {self.statics}" if self.statics else ""))
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        raise ValueError(f"mix row {b}: weight of {name!r} must be a number, got {value!r}")
                    w[b, self.columns.index(name)] = float(value)
        if not torch.isfinite(w).all():
            raise ValueError("mix has NaN or infinite weights")
        if (w < 0).any():
            b, e = (w < 0).nonzero()[0].tolist()
            raise ValueError(f"mix row {b}: weight of {self.columns[e]!r} is negative ({w[b, e].item()})")
        if self.statics:
            st = w[:, n:]
            bad = ((st != 0).sum(1) > 1) | (((st != 0).sum(1) == 1) & ((st.sum(1) != 1) | (w[:, :n] != 0).any(1)))
            if bad.any():
                b = int(bad.nonzero()[0])
                raise ValueError(f"mix row {b}: a static merge is served alone at weight 1 (got {w[b].tolist()} "
                                 f"over {self.columns})")
        return w

    def plan(self, mix: torch.Tensor | None, tokens: int, step_tokens: int | None = None) -> Plan:
        """The path a batch with this mix ([B, N], validated) takes, processing about `tokens` tokens in all and
        `step_tokens` in this forward (see planning.plan_batch; `self.policy` holds the kernels' costs)."""
        return plan_batch(mix, tokens, step_tokens, experts=self.columns, costs=self.costs, policy=self.policy,
                          is_cached=self.materialized.cached, budget_bytes=self.materialized.budget_bytes)

    def materialize(self, row: torch.Tensor) -> MixKey:
        """Build and cache W' = W + Σ_n w_n (B_n A_n + D_n) for every mixing layer; LRU within the budget."""
        return self.materialized.build(row)

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
            self.clear_mix()
        else:
            self.state.set(mix, key, kernel=plan.kernel)
        return plan

    def clear_mix(self) -> None:
        """Every mixing layer runs the core alone until the next `set_mix`."""
        self.state.set(None)

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
            self.clear_mix()

    def generate(self, prompts: Sequence[str | Sequence[Mapping[str, str]]], mix: MixLike = None, *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None, max_batch: int = 64,
                 materialize: bool = True) -> list[str]:
        """Generate a completion per prompt (a string, or chat messages rendered with the chat template).

        Each row keeps its own mix for the whole request; greedy when temperature == 0.
        """
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

