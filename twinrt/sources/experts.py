"""Experts as tensor sources over the base: full fine-tuned HF dirs, or PEFT LoRA adapters.

A LoRA expert's weight is `θ_base + scaling · B A` for every adapted module, with PEFT's per-module rank and
scaling (twinrt.adapter). Features that would change more than the adapted weights (DoRA, modules_to_save,
LoRA biases, ...) are refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from twinrt import adapter
from twinrt.errors import TwinError
from twinrt.sources.checkpoint import SafetensorsDir, TensorMeta, TensorSource, fingerprint_files, refuse_pickles

# config fields that change the math beyond θ + s·BA; each must have its neutral value
_UNSUPPORTED = {
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "lora_bias": (False, None),
    "trainable_token_indices": (None,),
    "layer_replication": (None,),
}


@dataclass(frozen=True)
class _Lora:
    """One module's LoRA factors, read from the adapter file when used (so N open experts hold no factors:
    a split's memory does not grow with the experts' adapters)."""

    file: Path
    a_key: str   # A: [r, in]   (embeddings: [r, num_embeddings])
    b_key: str   # B: [out, r]  (embeddings: [dim, r])
    rank: int
    scaling: float
    embedding: bool

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.file), framework="pt", device="cpu") as f:
            return f.get_tensor(self.a_key), f.get_tensor(self.b_key)

    def delta(self) -> torch.Tensor:
        a, b = self.factors()
        ba = b.float() @ a.float()  # [out, in]
        return self.scaling * (ba.T if self.embedding else ba)


class LoraExpert:
    """A PEFT LoRA adapter dir, read as the full weights it implies over `base`."""

    kind = "lora"

    def __init__(self, path: Path, base: TensorSource, name: str) -> None:
        self.path = Path(path)
        self.label = f"expert {name!r} ({path})"
        self.base = base
        cfg_file = self.path / adapter.CONFIG_FILE
        try:
            cfg: dict[str, Any] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise TwinError(f"{cfg_file} is not valid JSON: {e}") from None
        if cfg.get("peft_type") != "LORA":
            raise TwinError(f"{self.label}: adapter type {cfg.get('peft_type')!r} is not supported (only LORA)")
        for key, neutral in _UNSUPPORTED.items():
            if cfg.get(key) not in neutral:
                raise TwinError(f"{self.label}: adapter uses {key}={cfg.get(key)!r}, which twinrt does not support")
        if cfg.get("bias", "none") != "none":
            raise TwinError(f"{self.label}: adapter trains biases (bias={cfg['bias']!r}), not supported")
        self.config = cfg
        weights = self.path / adapter.WEIGHTS_FILE
        if not weights.is_file():
            refuse_pickles(self.path, self.label)
            raise TwinError(f"{self.label}: {adapter.WEIGHTS_FILE} is missing")
        self._files = [cfg_file, weights]
        self.loras = self._read(weights, cfg)

    def _read(self, weights: Path, cfg: dict[str, Any]) -> dict[str, _Lora]:
        """Every module's factors, checked by their shapes alone (read from the file's header; the tensors are
        read when used)."""
        parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = adapter.KEY.match(key)
                if m is None:
                    raise TwinError(f"{self.label}: unexpected tensor {key} in the adapter (not a LoRA A/B factor)")
                parts.setdefault(m["module"], {})[m["kind"]] = (key, tuple(f.get_slice(key).get_shape()))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        base_names = set(self.base.names())
        loras: dict[str, _Lora] = {}
        for module, p in sorted(parts.items()):
            embedding = "lora_embedding_A" in p
            a, b = ((p.get("lora_embedding_A"), p.get("lora_embedding_B")) if embedding
                    else (p.get("lora_A"), p.get("lora_B")))
            if a is None or b is None:
                raise TwinError(f"{self.label}: module {module} has only one of its two LoRA factors")
            (a_key, a_shape), (b_key, b_shape) = a, b
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise TwinError(f"{self.label}: module {module} has factors of shapes {list(a_shape)} and "
                                f"{list(b_shape)}, not matrices")
            r = adapter.module_rank(cfg, module)
            if a_shape[0] != r or b_shape[1] != r:
                raise TwinError(f"{self.label}: module {module} has factors of rank {a_shape[0]}/{b_shape[1]}, "
                                f"the config says r={r}")
            scaling = adapter.module_scaling(cfg, module)
            if fan_in_fan_out and not embedding:
                raise TwinError(f"{self.label}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
            name = f"{module}.weight"
            if name not in base_names:
                raise TwinError(f"{self.label}: adapted module {module} has no weight {name} in the base")
            shape = (a_shape[1], b_shape[0]) if embedding else (b_shape[0], a_shape[1])
            if shape != tuple(self.base.meta(name).shape):
                raise TwinError(f"{self.label}: LoRA of {module} implies shape {list(shape)}, the base weight "
                                f"{name} is {list(self.base.meta(name).shape)} (adapter for another base?)")
            loras[name] = _Lora(weights, a_key, b_key, r, scaling, embedding)
        if not loras:
            raise TwinError(f"{self.label}: the adapter holds no LoRA factors")
        return loras

    def names(self) -> list[str]:
        return self.base.names()

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(name)

    def get(self, name: str, base_tensor: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base.get(name) if base_tensor is None else base_tensor
        lora = self.loras.get(name)
        if lora is None:
            return base
        return (base.float() + lora.delta()).to(base.dtype)

    def fingerprint(self) -> str:
        return fingerprint_files(self._files)


class FullExpert(SafetensorsDir):
    """A full fine-tuned HF safetensors dir."""

    kind = "full"

    def __init__(self, path: Path, name: str) -> None:
        super().__init__(path, what=f"expert {name!r}")
        self.label = f"expert {name!r} ({path})"

    def get(self, name: str, base_tensor: torch.Tensor | None = None) -> torch.Tensor:
        return super().get(name)


def open_expert(path: Path, name: str, base: TensorSource) -> LoraExpert | FullExpert:
    """A LoRA adapter dir (it has adapter_config.json) or a full HF model dir."""
    path = Path(path)
    if not path.exists():
        raise TwinError(f"expert {name!r}: {path} does not exist")
    if not path.is_dir():
        raise TwinError(f"expert {name!r}: {path} is not a directory (expected an HF model or PEFT adapter dir)")
    if (path / adapter.CONFIG_FILE).is_file():
        return LoraExpert(path, base, name)
    return FullExpert(path, name)


# architecture fields that must agree between the base and a full expert, where both configs have them
ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings")


def check_compatible(base: TensorSource, base_config: dict[str, Any], expert: LoraExpert | FullExpert) -> None:
    """Raise a TwinError naming the first field or tensor where a full expert differs from the base."""
    if isinstance(expert, LoraExpert):
        return  # checked module by module against the base when the adapter was read
    for key in ARCH_FIELDS:
        if key in base_config and key in expert.config and base_config[key] != expert.config[key]:
            raise TwinError(f"{expert.label}: architecture differs from the base: {key} is "
                            f"{expert.config[key]!r}, the base has {base_config[key]!r}")
    base_names, exp_names = set(base.names()), set(expert.names())
    if base_names != exp_names:
        missing, extra = sorted(base_names - exp_names), sorted(exp_names - base_names)
        what = []
        if missing:
            what.append(f"missing {len(missing)} tensor(s) of the base, e.g. {missing[0]}")
        if extra:
            what.append(f"{len(extra)} tensor(s) the base lacks, e.g. {extra[0]}")
        raise TwinError(f"{expert.label}: tensor names differ from the base: {'; '.join(what)}")
    for name in sorted(base_names):
        b, e = base.meta(name), expert.meta(name)
        if b.shape != e.shape:
            raise TwinError(f"{expert.label}: tensor {name} has shape {list(e.shape)}, the base has {list(b.shape)}")
        if b.dtype != e.dtype:
            raise TwinError(f"{expert.label}: tensor {name} has dtype {e.dtype}, the base has {b.dtype}")
