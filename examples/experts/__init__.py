"""Training and evaluating the demo experts (LoRA or full fine-tunes of SmolLM2-135M-Instruct)."""
