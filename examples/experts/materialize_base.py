"""Write the demo base model (the dequantized SmolLM2-135M-Instruct GGUF) as a plain HF checkpoint dir.

    python -m examples.experts.materialize_base OUT [--overwrite]

OUT gets config.json, model.safetensors (float32), generation_config.json, the tokenizer files (with the
chat template) and base.json (where the weights come from: package, GGUF sha256). These are exactly the
weights the demo LoRA experts were trained over, so `PeftModel.from_pretrained(<OUT model>,
examples/experts/lora/<task>)` is that expert, and OUT can be the `base:` of a `twinrt split` config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from examples.experts.smollm import base_info, load_base
from twinrt.artifact import atomic_dir


def materialize(out_dir: Path) -> None:
    """Save the dequantized GGUF model and tokenizer to `out_dir` (built in a temp dir, then renamed)."""
    model, tokenizer = load_base()
    with atomic_dir(out_dir, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "base.json").write_text(json.dumps(base_info(), indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args()
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        parser.error(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    materialize(args.out)
    print(f"wrote {args.out}: " + ", ".join(sorted(p.name for p in args.out.iterdir())))


if __name__ == "__main__":
    main()
