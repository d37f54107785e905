"""A routed mix as one exact PEFT LoRA adapter, for engines that serve adapters (vLLM).

For a mix w over N experts, every factored module gets

    A_mix = [A_1; A_2; ...]                  rows of the active experts' A factors       [Σ r_i, in]
    B_mix = [w_1 B_1, w_2 B_2, ...]          their B factors, each scaled by its weight  [out, Σ r_i]

so B_mix A_mix = Σ w_i B_i A_i exactly: the adapter's rank is the sum of the active experts' ranks, written in
the PEFT format of the artifact's own experts (twinrt.adapter: scaling 1 for every module).

An engine caches adapters by a key, so mixes are quantised first (MixQuantizer): keep the `top_k` largest
weights, rescale them to the mix's total weight, round each to a multiple of `step`, and drop those that
round to zero. The key is the tuple of (expert index, multiple of step). The quantisation error of a mix is
reported as `Σ_i |w_i − ŵ_i|` (L1 over experts): at most `step / 2` per kept expert from rounding, plus the
mass moved off the experts top-k dropped. AdapterCache holds the adapters of recent keys for a vLLM engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from twinrt import adapter
from twinrt.artifact import Artifact
from twinrt.errors import TwinError

log = logging.getLogger(__name__)
MixKey = tuple[tuple[int, int], ...]  # ((expert index, weight in steps), ...), ascending expert index


@dataclass(frozen=True)
class MixQuantizer:
    """Top-k then rounding to a grid of `step` (see the module docstring)."""

    top_k: int = 2
    step: float = 0.05

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise TwinError(f"--mix-top-k must be >= 1, got {self.top_k}")
        if not 0.0 < self.step <= 1.0 or abs(1.0 / self.step - round(1.0 / self.step)) > 1e-6:
            raise TwinError(f"--mix-step must divide 1 (0.01, 0.05, 0.1, ...), got {self.step}: otherwise a "
                            "one-expert mix could not be served at weight 1")

    def one(self, i: int) -> MixKey:
        """The key of expert i alone at weight 1 (served by its own adapter)."""
        return ((i, round(1.0 / self.step)),)

    def key(self, mix: Sequence[float]) -> MixKey:
        """The quantised mix of `mix` ([N] non-negative weights) as a cache key; () is the core alone."""
        ranked = sorted((i for i, w in enumerate(mix) if w > 0), key=lambda i: (-mix[i], i))[: self.top_k]
        kept = sum(mix[i] for i in ranked)
        if kept <= 0:
            return ()
        scale = sum(w for w in mix if w > 0) / kept  # the dropped experts' mass goes to the kept ones
        out = []
        for i in sorted(ranked):
            steps = round(mix[i] * scale / self.step)
            if steps > 0:
                out.append((i, steps))
        return tuple(out)

    def weights(self, key: MixKey, n: int) -> tuple[float, ...]:
        """The [N] weights a key stands for."""
        w = [0.0] * n
        for i, steps in key:
            w[i] = steps * self.step
        return tuple(w)

    def error(self, mix: Sequence[float]) -> float:
        """Σ_i |w_i − ŵ_i|: how far the served (quantised) mix is from the requested one."""
        q = self.weights(self.key(mix), len(mix))
        return float(sum(abs(a - b) for a, b in zip(mix, q)))


class MixAdapterBuilder:
    """Writes the mix adapter of a key from an artifact's experts' factors (loaded once, float32)."""

    def __init__(self, art: Artifact, dtype: torch.dtype = torch.float32) -> None:
        self.art = art
        self.dtype = dtype
        self.experts = list(art.experts)
        # expert index -> module ("model.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r])
        self.factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for name in self.experts:
            loaded = art.load_factors(name, dtype=torch.float32)
            self.factors.append({w.removesuffix(".weight"): ab for w, ab in loaded.items()})
        self.modules = sorted({m for f in self.factors for m in f})

    def rank(self, key: MixKey) -> int:
        """The largest per-module rank of a key's adapter (what an engine's max LoRA rank must hold)."""
        return max((sum(self.factors[i][m][0].shape[0] for i, _ in key if m in self.factors[i])
                    for m in self.modules), default=0)

    def max_rank(self, top_k: int) -> int:
        """The largest rank any quantised mix with at most `top_k` experts can need."""
        per_module = [sorted((f[m][0].shape[0] for f in self.factors if m in f), reverse=True)[:top_k]
                      for m in self.modules]
        return max((sum(r) for r in per_module), default=0)

    def tensors(self, key: MixKey, weights: Sequence[float]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """(adapter tensors in PEFT's naming, module -> rank) of the mix `weights` over the key's experts."""
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for m in self.modules:
            parts = [(self.factors[i][m], weights[i]) for i, _ in key if m in self.factors[i]]
            if not parts:
                continue
            a = torch.cat([ab[0] for ab, _ in parts])  # [Σ r, in]
            b = torch.cat([ab[1] * w for ab, w in parts], dim=1)  # [out, Σ r]
            a_key, b_key = adapter.lora_keys(m)
            tensors[a_key] = a.to(self.dtype).contiguous()
            tensors[b_key] = b.to(self.dtype).contiguous()
            ranks[m] = a.shape[0]
        return tensors, ranks

    def write_zero(self, out: Path) -> Path:
        """An adapter of rank 1 whose factors are all zero: the core, exactly, as an adapter (see vllm_backend)."""
        tensors: dict[str, torch.Tensor] = {}
        for m in self.modules:
            a, b = next(f[m] for f in self.factors if m in f)
            a_key, b_key = adapter.lora_keys(m)
            tensors[a_key] = torch.zeros(1, a.shape[1], dtype=self.dtype)
            tensors[b_key] = torch.zeros(b.shape[0], 1, dtype=self.dtype)
        return _write(out, tensors, {m: 1 for m in self.modules})

    def write(self, key: MixKey, weights: Sequence[float], out: Path) -> Path:
        """Write the adapter to the new directory `out` (adapter_model.safetensors + adapter_config.json)."""
        tensors, ranks = self.tensors(key, weights)
        if not tensors:
            raise ValueError("a mix adapter needs at least one expert with factors")
        return _write(out, tensors, ranks)



@dataclass
class _Adapter:
    request: Any       # vllm LoRARequest
    path: Path
    owned: bool        # a mix adapter we wrote (evictable), or an expert's own adapter in the artifact
    users: int = 0


class AdapterCache:
    """Quantised mix key -> LoRARequest. Builds on demand (in a thread), evicts idle mix adapters past
    `capacity` (deleting their files and removing them from the engine); experts' own adapters stay."""

    def __init__(self, builder: MixAdapterBuilder, quantizer: MixQuantizer, workdir: Path, capacity: int,
                 engine: Any = None, zero_core: bool = False, statics: dict[str, Path] | None = None,
                 previous: AdapterCache | None = None) -> None:
        """`previous`: the cache of the expert set served before this one (an expert update): its adapter ids
        continue, and its experts', static merges' and core's adapters are reused (the same files, already
        loaded in vLLM); its mix adapters are over the old expert order and are not."""
        from vllm.lora.request import LoRARequest

        self._lora_request = LoRARequest
        self.builder = builder
        self.quantizer = quantizer
        self.workdir = workdir
        self.capacity = capacity
        self.engine = engine  # AsyncLLM: remove_lora on eviction
        self.entries: OrderedDict[MixKey, _Adapter] = OrderedDict()
        # a rebuilt adapter gets a new id: vLLM caches adapters by id
        self._ids = previous._ids if previous is not None else itertools.count(1)
        self._building: dict[MixKey, asyncio.Future] = {}
        self.built = 0
        self.evicted = 0
        # a kept adapter is one whose files the artifact records unchanged (not a name removed and added again)
        same = _same_files(previous.builder.art, builder.art) if previous is not None else set()
        old = {e.request.lora_name: e.request for e in previous.entries.values() if not e.owned
               and e.request.lora_name.removeprefix("expert:") in same} if previous else {}
        n = len(builder.experts)
        # one expert at weight 1 uses the expert's own adapter, staged in the workdir: vLLM reads an adapter's
        # files whenever it loads it again, and an expert update may delete the artifact's copy while a request
        # still holds it (a missing adapter kills vLLM's engine core)
        for i, name in enumerate(builder.experts):
            request = old.get(f"expert:{name}")
            if request is None:
                lora_id = next(self._ids)
                path = _stage(builder.art.expert_dir(name), workdir / f"expert-{lora_id}")
                request = LoRARequest(f"expert:{name}", lora_id, str(path))
            self.entries[quantizer.one(i)] = _Adapter(request, Path(request.lora_path), owned=False)
        self._n = n
        # static merges stored as exact factors: each its own adapter, fixed like the experts'
        kept = {k: v for k, v in previous.statics.items() if k in same} if previous is not None else {}
        self.static_users = 0  # requests on a static merge's adapter
        self.statics = {}
        for name, src in (statics or {}).items():
            request = kept.get(name)
            if request is None:
                lora_id = next(self._ids)
                request = LoRARequest(name, lora_id, str(_stage(src, workdir / f"static-{lora_id}")))
            self.statics[name] = request
        self.core: Any = None
        if previous is not None and previous.core is not None:
            self.core = previous.core
        elif zero_core:  # the core as an all-zero adapter (see VLLMBackend.zero_core)
            path = builder.write_zero(workdir / "core-zero")
            self.core = LoRARequest("core", next(self._ids), str(path))

    def lora_ids(self) -> set[int]:
        """The adapter ids this cache hands out."""
        ids = {e.request.lora_int_id for e in self.entries.values()} | {r.lora_int_id for r in self.statics.values()}
        return ids | ({self.core.lora_int_id} if self.core is not None else set())

    def in_use(self) -> bool:
        return any(e.users for e in self.entries.values()) or bool(self._building) or self.static_users > 0

    async def drop(self, ids: set[int]) -> None:
        """Remove this cache's adapters with these ids from vLLM and delete their files in the workdir (mix
        adapters and staged copies); for a cache replaced by an expert update, once no request uses them."""
        for r in [e.request for e in self.entries.values()] + list(self.statics.values()):
            if r.lora_int_id not in ids:
                continue
            if self.engine is not None:
                try:
                    await self.engine.remove_lora(r.lora_int_id)
                except Exception:  # noqa: BLE001 - not loaded (never used, or already dropped by vLLM's LRU)
                    log.debug("remove_lora(%s) failed", r.lora_int_id, exc_info=True)
            path = Path(r.lora_path)
            if path.parent == self.workdir:
                shutil.rmtree(path, ignore_errors=True)

    async def acquire(self, key: MixKey) -> Any:
        """The LoRARequest of a key (None or the zero adapter for the core), in use until `release(key)`."""
        if not key or self.builder.rank(key) == 0:  # the core, or experts without any factors
            return self.core
        entry = self.entries.get(key)
        if entry is None:
            pending = self._building.get(key)
            if pending is None:
                pending = self._building[key] = asyncio.get_running_loop().create_future()
                try:
                    entry = await self._build(key)
                except BaseException as e:
                    pending.set_exception(e)
                    pending.exception()  # retrieved: a failed build with no waiters is not a warning
                    raise
                finally:
                    del self._building[key]
                pending.set_result(entry)
            else:
                entry = await asyncio.shield(pending)
        self.entries.move_to_end(key)
        entry.users += 1
        await self._evict()
        return entry.request

    def release(self, key: MixKey) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.users > 0:
            entry.users -= 1

    async def _build(self, key: MixKey) -> _Adapter:
        lora_id = next(self._ids)
        path = self.workdir / f"mix-{lora_id}"
        weights = self.quantizer.weights(key, self._n)
        await asyncio.to_thread(self.builder.write, key, weights, path)
        name = "mix:" + ",".join(f"{self.builder.experts[i]}={s * self.quantizer.step:g}" for i, s in key)
        entry = _Adapter(self._lora_request(name, lora_id, str(path)), path, owned=True)
        self.entries[key] = entry
        self.built += 1
        return entry

    async def _evict(self) -> None:
        owned = [k for k, e in self.entries.items() if e.owned]
        excess = len(owned) - self.capacity
        for k in owned:  # least recently used first
            if excess <= 0:
                break
            e = self.entries[k]
            if e.users:
                continue
            del self.entries[k]
            excess -= 1
            self.evicted += 1
            if self.engine is not None:
                try:
                    await self.engine.remove_lora(e.request.lora_int_id)
                except Exception:  # noqa: BLE001 - not loaded (never used, or already dropped by vLLM's LRU)
                    log.debug("remove_lora(%s) failed", e.request.lora_int_id, exc_info=True)
            shutil.rmtree(e.path, ignore_errors=True)

    def owned_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.owned)


def _same_files(a: Artifact, b: Artifact) -> set[str]:
    """The experts (names) and static arms ("static:<label>") whose files two manifests record alike."""
    def files(art: Artifact, name: str) -> dict[str, str]:
        prefix = f"{art.expert_dir(name).relative_to(art.path)}/"
        return {k: v for k, v in art.manifest.files.items() if k.startswith(prefix)}

    names = (set(a.experts) & set(b.experts)) | (set(a.statics) & set(b.statics))
    return {n for n in names if files(a, n) == files(b, n)}


def _stage(src: Path, out: Path) -> Path:
    """A copy of the adapter directory `src` at `out`: hard links where the filesystem allows, else copies."""
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, out / f.name)
            except OSError:
                shutil.copy2(f, out / f.name)
    return out


def _write(out: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> Path:
    """The new adapter directory `out`: adapter_model.safetensors and adapter_config.json."""
    out.mkdir(parents=True)
    save_file(tensors, str(out / adapter.WEIGHTS_FILE))
    adapter.write_config(out, ranks)
    return out
