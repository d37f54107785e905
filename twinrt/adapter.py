"""The PEFT LoRA adapter format, in one place: tensor key names, per-module rank and alpha, and the config file.

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight   A: [r, in]
                                base_model.model.<module>.lora_B.weight   B: [out, r]
    adapter_config.json         peft.LoraConfig(...).to_dict(), sets written as sorted lists

A module's weight delta is `scaling · B A` with scaling = alpha / r (alpha / √r with rsLoRA), where r and
alpha come from `rank_pattern` / `alpha_pattern` when a pattern matches the module (PEFT's rule: the first
pattern that matches the end of the module name, after a dot) and from `r` / `lora_alpha` otherwise.
Adapters twinrt writes have scaling 1 for every module: lora_alpha == r, with patterns where ranks differ.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

PREFIX = "base_model.model."  # what PEFT puts before a module's name in an adapter's tensor keys
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# every factor key an adapter may hold: linear layers' lora_A/B, embeddings' lora_embedding_A/B
KEY = re.compile(rf"^{re.escape(PREFIX)}(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                 r"(?:\.weight)?$")


def lora_keys(module: str) -> tuple[str, str]:
    """The tensor keys of a linear module's factors: (A's key, B's key)."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of `module` (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_rank(config: dict[str, Any], module: str) -> int:
    """The rank r of one module under an adapter config (rank_pattern, else r)."""
    return pattern_value(config.get("rank_pattern") or {}, module, config["r"])


def module_scaling(config: dict[str, Any], module: str) -> float:
    """The scaling of one module's B A under an adapter config: alpha / r, or alpha / √r with rsLoRA."""
    r = module_rank(config, module)
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_config(ranks: dict[str, int]) -> dict[str, Any]:
    """The PEFT LoraConfig of an adapter with these module ranks (module -> r) and scaling 1 for every module.

    r is the largest rank; modules of another rank get it in rank_pattern, and alpha_pattern the same value,
    so lora_alpha == r everywhere. No modules: r 1 and no target modules.
    """
    from peft import LoraConfig

    r = max(ranks.values(), default=1)
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks) or None, rank_pattern=pattern,
                     alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     inference_mode=True)
    return cfg.to_dict()


def write_config(directory: Path, ranks: dict[str, int]) -> Path:
    """Write DIRECTORY/adapter_config.json for these module ranks (see `adapter_config`); returns its path."""
    path = Path(directory) / CONFIG_FILE
    path.write_text(json.dumps(adapter_config(ranks), indent=2, default=sorted))  # sets (target_modules) as lists
    return path
