"""Tiny real models for tests: a random Llama (hidden 32, GQA), a small BPE tokenizer, and experts.

Experts are made the way mergekit's tests make them: the base plus random task vectors of a realistic shape
(low-rank plus noise on every weight), or PEFT LoRA adapters with random non-zero factors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "what is two plus three", "translate cat to french", "write a python function", "the capital of france is paris",
    "def add(a, b): return a + b", "5 + 7 = 12", "bonjour le monde", "hello world", "sum the numbers 1 2 3",
    "the quick brown fox jumps over the lazy dog", "0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def make_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_config(vocab: int, **over) -> LlamaConfig:
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(over)
    return LlamaConfig(**kw)


def make_base(out: Path, seed: int = 0, **over) -> LlamaForCausalLM:
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tok), **over)).eval()
    with torch.no_grad():  # random init is ~N(0, 0.02); make norms non-trivial too
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


def task_vector_like(t: torch.Tensor, gen: torch.Generator, scale: float = 0.01, rank: int = 4) -> torch.Tensor:
    """A realistic task vector: low-rank structure plus small dense noise (1-D tensors: noise only)."""
    if t.ndim == 2:
        u = torch.randn(t.shape[0], rank, generator=gen)
        v = torch.randn(rank, t.shape[1], generator=gen)
        low = (u @ v) / (rank * t.shape[1]) ** 0.5
        return scale * (low + 0.3 * torch.randn(t.shape, generator=gen) / t.shape[1] ** 0.5)
    return scale * torch.randn(t.shape, generator=gen)


def make_full_expert(base_dir: Path, out: Path, seed: int, scale: float = 0.05) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(task_vector_like(p, gen, scale))
    model.save_pretrained(out)
    return model


def make_lora_expert(base_dir: Path, adapter_out: Path, merged_out: Path, seed: int, r: int = 4,
                     rank_pattern: dict | None = None) -> None:
    """A PEFT LoRA adapter with random non-zero factors, and the same expert merged into a full checkpoint."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"],
                     rank_pattern=rank_pattern or {}, init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    peft_model.save_pretrained(adapter_out)
    peft_model.merge_and_unload().save_pretrained(merged_out)


def make_lora_artifact(root: Path, experts: tuple[str, ...] = ("math", "code", "chat"), rank: int = 8,
                       **over) -> Path:
    """A twin artifact of LoRA experts (no dense deltas, so every engine that serves LoRA can serve it) over a
    tiny Llama whose head size vLLM's kernels take (64), with initialisation wide enough that greedy tokens
    are decided by clear logit margins, not by float rounding."""
    from twinrt.config import parse_config
    from twinrt.split.run import split

    kw = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
              initializer_range=0.2)
    kw.update(over)
    make_base(root / "base", **kw)
    paths = {}
    for i, name in enumerate(experts):
        make_lora_expert(root / "base", root / f"{name}-lora", root / f"{name}-merged", seed=40 + i)
        paths[name] = root / f"{name}-lora"
    cfg = {"base": str(root / "base"), "experts": [{"name": n, "path": str(p)} for n, p in paths.items()],
           "shared": {"method": "task_arithmetic"}, "exclusive": {"rank": rank}}
    split(parse_config(cfg), root / "artifact")
    return root / "artifact"
