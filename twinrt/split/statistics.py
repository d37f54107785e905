"""The calibration statistics pass: one expert at a time, with that expert's own weights, running sums only.

    plan = StatisticsPlan(kinds, linear)              # what to collect (the method's statistics()), where
    costs = collect_statistics(model, experts, plan, workdir, weights_of, tick)   # one file per expert
    read = StatisticsFiles([workdir / f"{e}.safetensors" for e in experts])       # read(name) -> TensorStats

What is summed over an expert's calibration examples (`twinrt.split.calibration`), with forward hooks on the
linear layers and tensor hooks on their outputs (definitions in `twinrt.merge.stats`):

    gram_in[W]   Σ_t x_t x_tᵀ, x_t the input of linear W at every token the attention mask keeps   / T tokens
    gram_out[W]  Σ_t g_t g_tᵀ, g_t = ∂ℓ/∂y_t at those tokens                                       / E examples
    fisher[p]    Σ_examples (∂ℓ/∂p)², one example per backward pass                              / E examples

ℓ is an example's log-likelihood of its reference tokens (the answer of a chat example, every token of plain
text): the *empirical* Fisher, on the data's own answers, not on tokens sampled from the model. Linear layers
that read the very same input tensor (a layer's q, k and v projections; gate and up) have one input Gram,
summed and stored once (`shared_inputs`; the file's metadata maps the others to it). The pass
holds one model, its gradients when Fishers are collected (only the input embeddings' output is made to need
a gradient when only Grams are), and one expert's sums, which are written to disk before the next expert:
memory does not grow with the number of experts. The statistics are float32.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from twinrt.artifact.stwriter import SafetensorsWriter
from twinrt.errors import TwinError
from twinrt.merge.stats import FISHER, GRAM_IN, GRAM_OUT, KINDS, TensorStats
from twinrt.sources.model import assign_weights
from twinrt.split.calibration import Calibration, Sample

Tick = Callable[[str], None]  # called once per example done, with a description
ALIASES = "gram_in_aliases"  # file metadata: {weight: the weight whose input Gram it shares}
Weights = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class StatisticsPlan:
    """Which statistics to collect (`twinrt.merge.stats.KINDS`), and the linear weights whose Grams count."""

    kinds: frozenset[str]
    linear: tuple[str, ...]

    @property
    def needs_grad(self) -> bool:
        return bool(self.kinds & {FISHER, GRAM_OUT})


@dataclass(frozen=True)
class ExpertCost:
    """What one expert's pass took."""

    expert: str
    data: str
    examples: int
    tokens: int  # every token of every example (the Grams' T)
    scored_tokens: int  # the reference tokens whose log-likelihood the gradients are of
    seconds: float
    bytes: int  # the statistics file
    peak_rss_bytes: int | None  # the process's peak resident memory during this pass (Linux), else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """This process's peak resident set size in bytes since the last reset (VmHWM), None where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def shared_inputs(model: nn.Module, linear: Sequence[str]) -> dict[str, str]:
    """{weight: the first weight of `linear`, in call order, that reads the very same input tensor} for every weight
    whose input an earlier one reads too, found by one probe forward pass that keeps every input alive (so
    `is` compares tensors, never a reused address)."""
    modules = dict(model.named_modules())
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [modules[w.removesuffix(".weight")].register_forward_hook(
        lambda _m, args, _out, w=w: seen.append((w, args[0]))) for w in linear]
    try:
        with torch.no_grad():
            model.base_model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    owners: list[tuple[str, torch.Tensor]] = []
    alias = {}
    for w, x in seen:
        owner = next((o for o, y in owners if y is x), None)
        if owner is None:
            owners.append((w, x))
        elif owner != w:
            alias[w] = owner
    return alias


class _Sums:
    """One expert's running sums, and the hooks on the model that add to them."""

    def __init__(self, model: nn.Module, plan: StatisticsPlan) -> None:
        self.mask: torch.Tensor | None = None  # [B, T] bool: the tokens of the batch being run
        self.alias = shared_inputs(model, plan.linear) if GRAM_IN in plan.kinds else {}
        self.inputs: dict[str, torch.Tensor] = {}  # owner weight -> its input in the batch being run
        self.gram_in: dict[str, torch.Tensor] = {}
        self.gram_out: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for weight in plan.linear:
            module = modules.get(weight.removesuffix(".weight"))
            if not isinstance(module, nn.Linear):
                raise TwinError(f"{weight} is not the weight of a linear layer of {type(model).__name__}")
            dev = module.weight.device
            if GRAM_IN in plan.kinds and weight not in self.alias:
                self.gram_in[weight] = torch.zeros(module.in_features, module.in_features, device=dev)
            if GRAM_OUT in plan.kinds:
                self.gram_out[weight] = torch.zeros(module.out_features, module.out_features, device=dev)
            self.handles.append(module.register_forward_hook(self._linear_hook(weight)))
        self.params = dict(model.named_parameters()) if FISHER in plan.kinds else {}
        self.fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        if plan.needs_grad and not self.params:  # Grams of output gradients only: no parameter gradients
            embed = model.get_input_embeddings()
            self.handles.append(embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_()))

    def _linear_hook(self, weight: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            mask = self.mask
            if weight in self.gram_in:
                x = args[0].detach()[mask].float()  # [K, in]
                self.gram_in[weight].addmm_(x.T, x)
                self.inputs[weight] = args[0]
            elif weight in self.alias and args[0] is not self.inputs.get(self.alias[weight]):
                raise RuntimeError(f"{weight} no longer reads the input of {self.alias[weight]}, as the probe found")
            if weight in self.gram_out and output.requires_grad:
                acc = self.gram_out[weight]

                def grad_hook(g: torch.Tensor) -> None:
                    gm = g.detach()[mask].float()  # [K, out]
                    acc.addmm_(gm.T, gm)

                output.register_hook(grad_hook)
        return hook

    def start(self, mask: torch.Tensor) -> None:
        """A new batch: its attention mask [B, T]."""
        self.mask = mask.bool()
        self.inputs.clear()

    def add_fisher(self) -> None:
        """Add the squared gradient of the last backward pass (one example) and clear the gradients."""
        for name, p in self.params.items():
            if p.grad is not None:
                self.fisher[name].add_(p.grad.float().square())
                p.grad = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def batch_tensors(samples: Sequence[Sample], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded `input_ids`, `attention_mask` and `scored`, each [B, T_max]."""
    width = max(len(s.ids) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    scored = torch.zeros(len(samples), width, dtype=torch.bool)
    for r, s in enumerate(samples):
        ids[r, :len(s.ids)] = torch.tensor(s.ids)
        mask[r, :len(s.ids)] = 1
        scored[r, :len(s.ids)] = torch.tensor(s.scored)
    return ids.to(device), mask.to(device), scored.to(device)


def log_likelihood(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Σ log p(ids[t] | ids[:t]) over the scored tokens t.  logits: [B, T, V], ids / scored: [B, T]."""
    keep = scored[:, 1:]  # token t is predicted at position t − 1
    lp = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)  # [K, V]
    return lp.gather(1, ids[:, 1:][keep][:, None]).sum()


def expert_statistics(model: nn.Module, calib: Calibration, plan: StatisticsPlan, out: Path, *, expert: str,
                      tick: Tick | None = None) -> ExpertCost:
    """Run `calib` through `model` (holding the expert's weights) and write its statistics to `out`."""
    t0 = time.perf_counter()
    measured = reset_peak_rss()
    device = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(FISHER in plan.kinds)
    sums = _Sums(model, plan)
    step = 1 if FISHER in plan.kinds else calib.batch_size  # a Fisher needs each example's own gradient
    tokens = 0
    try:
        for i in range(0, len(calib.samples), step):
            chunk = calib.samples[i:i + step]
            ids, mask, scored = batch_tensors(chunk, device)
            sums.start(mask)
            tokens += int(mask.sum())
            if plan.needs_grad:
                with torch.enable_grad():
                    log_likelihood(model(input_ids=ids, attention_mask=mask).logits, ids, scored).backward()
                sums.add_fisher()
            else:
                with torch.no_grad():
                    model.base_model(input_ids=ids, attention_mask=mask)  # the linear layers' inputs, no head
            if tick:
                for _ in chunk:
                    tick(f"statistics {expert}")
    finally:
        sums.remove()
        sums.inputs.clear()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
    examples = len(calib.samples)
    writer = SafetensorsWriter(out.parent, out.name.removesuffix(".safetensors"), max_shard_bytes=1 << 62,
                               metadata={"expert": expert, "examples": str(examples), "tokens": str(tokens),
                                         ALIASES: json.dumps(sums.alias, sort_keys=True)})
    for name, g in sums.gram_in.items():
        writer.add(f"{GRAM_IN}/{name}", (g / tokens).cpu())
    for name, g in sums.gram_out.items():
        writer.add(f"{GRAM_OUT}/{name}", (g / examples).cpu())
    for name, f in sums.fisher.items():
        writer.add(f"{FISHER}/{name}", (f / examples).cpu())
    writer.close()
    return ExpertCost(expert=expert, data=str(calib.source), examples=examples, tokens=tokens,
                      scored_tokens=calib.scored, seconds=round(time.perf_counter() - t0, 3),
                      bytes=out.stat().st_size, peak_rss_bytes=peak_rss() if measured else None)


def collect_statistics(model: nn.Module, calibrations: Mapping[str, Calibration], plan: StatisticsPlan,
                       workdir: Path, weights_of: Callable[[str], Weights],
                       progress: Callable[[int], Tick] | None = None) -> list[ExpertCost]:
    """Each expert's statistics in `workdir/<expert>.safetensors`, in `calibrations` order: the expert's weights
    (`weights_of(expert)`) are copied into `model` first. `progress(total)` may return a tick per example, one
    bar per expert."""
    costs = []
    for expert, calib in calibrations.items():
        assign_weights(model, weights_of(expert))
        tick = progress(len(calib.samples)) if progress else None
        costs.append(expert_statistics(model, calib, plan, workdir / f"{expert}.safetensors", expert=expert,
                                       tick=tick))
    return costs


class StatisticsFiles:
    """The experts' statistics files (mix order), read one tensor at a time: `read(name) -> TensorStats`."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._files = [safe_open(str(p), framework="pt", device="cpu") for p in paths]
        self._keys = [set(f.keys()) for f in self._files]
        self._alias = [json.loads((f.metadata() or {}).get(ALIASES, "{}")) for f in self._files]

    def __call__(self, name: str) -> TensorStats:
        found: dict[str, torch.Tensor] = {}
        for kind in KINDS:
            keys = [f"{kind}/{alias.get(name, name) if kind == GRAM_IN else name}" for alias in self._alias]
            have = [key in present for key, present in zip(keys, self._keys)]
            if all(have):
                found[kind] = torch.stack([f.get_tensor(key) for f, key in zip(self._files, keys)])  # [N, ...]
            elif any(have):
                raise TwinError(f"the statistics of {name} ({kind}) exist for some experts only")
        return TensorStats(**found)
