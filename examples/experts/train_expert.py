"""Fine-tune SmolLM2-135M-Instruct on one task of the demo suite: a LoRA adapter or a full fine-tune.

    python -m examples.experts.train_expert --task date_us --out examples/experts/lora/date_us \
        [--mode lora|full] [--steps 60] [--lr 2e-3] [--seed 0] [--batch-size 8] [--overwrite]

- `--mode lora`: PEFT LoRA (r=8, alpha=16, no dropout) on every linear layer of the decoder (q, k, v, o,
  gate, up, down). Saved with `save_pretrained` (adapter_config.json + adapter_model.safetensors) in
  `--save-dtype` (default bfloat16); the weights are rounded to that dtype before the validation run, so
  the reported accuracy is the saved adapter's. `base_model_name_or_path` is `smollm.BASE_SOURCE`.
- `--mode full`: every weight except the (tied) token embeddings, which stay frozen so that the expert's
  delta to the base is zero there. Saved as an HF checkpoint (config, model.safetensors, tokenizer,
  generation_config) in `--save-dtype` (default float32: rounding to bf16 would change every weight).

Training: the model's chat template, loss on the assistant reply (+ eos) only, AdamW, linear warmup over
10% of the steps then cosine decay, bf16 autocast on CPU, gradient clipping at 1. The batch order comes
from `--seed`, as does the LoRA initialization. `training.json` beside the weights records the arguments,
the base's fingerprint, the loss curve and the validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from examples.experts.smollm import BASE_SOURCE, base_info, load_base
from examples.experts.taskdata import IGNORE, collate, encode, evaluate, load_split, load_suite
from twinrt.artifact import atomic_dir

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = {"lora": 2e-3, "full": 5e-5}
DEFAULT_SAVE_DTYPE = {"lora": "bfloat16", "full": "float32"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WARMUP_SHARE = 0.1


def answer_loss(causal_lm: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the reply tokens; the LM head runs on those positions only."""
    hidden = causal_lm.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # [B, T, d]
    targets = batch["labels"][:, 1:]  # [B, T-1]: token t+1 is predicted at position t
    keep = targets != IGNORE  # [B, T-1]
    logits = causal_lm.lm_head(hidden[:, :-1][keep])  # [K, V]
    return F.cross_entropy(logits.float(), targets[keep])


def lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first 10% of `total` steps, then cosine decay to 0."""
    warmup = max(1, round(total * WARMUP_SHARE))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def prepare(model: PreTrainedModel, args: argparse.Namespace) -> torch.nn.Module:
    """The trainable model: a PeftModel for `lora`, the base with frozen embeddings for `full`."""
    if args.mode == "lora":
        config = LoraConfig(
            r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
            target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
        )
        wrapped = get_peft_model(model, config)
        wrapped.peft_config["default"].base_model_name_or_path = BASE_SOURCE
        return wrapped
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with lm_head: both stay the base's
    return model


def causal_lm_of(trainable: torch.nn.Module) -> PreTrainedModel:
    """The LlamaForCausalLM inside (PEFT injects its layers in place)."""
    return trainable.get_base_model() if isinstance(trainable, PeftModel) else trainable


def train(trainable: torch.nn.Module, rows: list[tuple[list[int], list[int]]], pad_id: int,
          args: argparse.Namespace) -> list[float]:
    """Run `args.steps` optimizer steps over shuffled epochs of `rows`; returns the loss of every step."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps))
    order_rng = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    losses: list[float] = []
    causal_lm = causal_lm_of(trainable)
    trainable.train(True)
    start = time.perf_counter()
    for step in range(args.steps):
        while len(order) < args.batch_size:
            order += torch.randperm(len(rows), generator=order_rng).tolist()
        batch = collate([rows[i] for i in order[: args.batch_size]], pad_id)
        order = order[args.batch_size :]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = answer_loss(causal_lm, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            window = losses[-args.log_every :]
            print(f"step {step + 1:4d}/{args.steps}  loss {sum(window) / len(window):.4f}  "
                  f"lr {schedule.get_last_lr()[0]:.2e}  {time.perf_counter() - start:6.1f}s", flush=True)
    trainable.train(False)
    return losses


def round_trainable(trainable: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every trainable weight to `dtype` in place (kept in its own dtype), as saving will."""
    with torch.no_grad():
        for p in trainable.parameters():
            if p.requires_grad:
                p.copy_(p.to(dtype).to(p.dtype))


def sort_target_modules(adapter_dir: Path) -> None:
    """Rewrite adapter_config.json with `target_modules` sorted: PEFT keeps them in a set, whose order
    depends on the string hash seed, so the file would differ from run to run. Same layout as PEFT's."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def save(trainable: torch.nn.Module, tokenizer, out_dir: Path, args: argparse.Namespace, record: dict) -> None:
    """Write the adapter or checkpoint plus training.json into a temp dir beside `out_dir`, then rename."""
    with atomic_dir(out_dir, force=True) as tmp:
        if args.mode == "lora":
            # Embeddings are not adapted; False also skips PEFT's look-up of the base's config by name.
            trainable.to(DTYPES[args.save_dtype]).save_pretrained(tmp, save_embedding_layers=False)
            sort_target_modules(tmp)
            (tmp / "README.md").unlink(missing_ok=True)  # PEFT's generated model card: empty boilerplate
        else:
            trainable.to(DTYPES[args.save_dtype]).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="task name from suite.json")
    parser.add_argument("--out", type=Path, required=True, help="output dir (adapter or checkpoint)")
    parser.add_argument("--tasks-dir", type=Path, default=Path("examples/tasks"))
    parser.add_argument("--base", type=Path, default=None,
                        help="HF checkpoint of the base (default: the dequantized GGUF, identical weights)")
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3 (lora), 5e-5 (full)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--save-dtype", choices=tuple(DTYPES), default=None,
                        help="default: bfloat16 (lora), float32 (full)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest on a busy 2-core machine, 2 on an idle one")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    args.lr = DEFAULT_LR[args.mode] if args.lr is None else args.lr
    args.save_dtype = args.save_dtype or DEFAULT_SAVE_DTYPE[args.mode]
    if args.steps < 1 or args.batch_size < 1 or args.rank < 1 or args.lr <= 0:
        parser.error("--steps, --batch-size, --rank and --lr must be positive")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    return args


def main() -> None:
    args = parse_args()
    spec = load_suite(args.tasks_dir).get(args.task)
    train_set = load_split(args.tasks_dir, args.task, "train")  # exits with the known names if unknown
    val_set = load_split(args.tasks_dir, args.task, "validation")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load_base(args.base)
    rows = [encode(tokenizer, e) for e in train_set]
    print(f"{args.task}: {len(rows)} train examples, up to {max(len(r[0]) for r in rows)} tokens; "
          f"mode {args.mode}, {args.steps} steps x {args.batch_size}, lr {args.lr}", flush=True)
    trainable = prepare(model, args)
    n_train = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
    t1 = time.perf_counter()
    losses = train(trainable, rows, tokenizer.pad_token_id, args)
    t2 = time.perf_counter()
    round_trainable(trainable, DTYPES[args.save_dtype])
    accuracy, predictions = evaluate(trainable, tokenizer, val_set, spec.metric)
    t3 = time.perf_counter()
    wrong = [(e.answer, p) for e, p in zip(val_set, predictions, strict=True) if p != e.answer][:5]
    print(f"validation {spec.metric} accuracy of {args.task}: {accuracy:.3f}  "
          f"(train {t2 - t1:.0f}s, eval {t3 - t2:.0f}s)")
    for answer, prediction in wrong:
        print(f"  expected {answer!r}, got {prediction!r}")
    record = {
        "task": args.task,
        "mode": args.mode,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "overwrite"},
        "base": base_info(),
        "trainable_parameters": n_train,
        "train_loss_every_step": [round(x, 4) for x in losses],
        "validation_accuracy": accuracy,
        "seconds": {"load": round(t1 - t0, 1), "train": round(t2 - t1, 1), "validation": round(t3 - t2, 1)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    save(trainable, tokenizer, args.out, args, record)
    print(f"saved {args.mode} expert to {args.out}")


if __name__ == "__main__":
    main()
