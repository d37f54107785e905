"""Plain helpers shared by the tests (fixtures live in conftest.py, tiny models in tiny.py).

Test modules import shared code from here, `tiny` or the packages, never from another test module.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml

from router.synthetic import make_prompts

if TYPE_CHECKING:
    from serving.server import ServeOptions, ThreadedServer
    from twinrt.artifact import Artifact
    from twinrt.runtime import TwinModel

EXPERTS = ("math", "code", "chat")  # the session artifacts' experts, the synthetic prompts' classes too
KEY = "sk-test-serving"  # the API key of the tests' live servers


# ---- devices -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCase:
    """Where and in what dtype a runtime equivalence test runs, and how close its two sides must be: `tol`
    times the reference's largest magnitude (at least 1). Exact-path tests compare at float32 only (`exact`)."""

    device: str
    dtype: torch.dtype
    tol: float

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def exact(self) -> bool:
        return self.dtype == torch.float32

    def atol(self, want: torch.Tensor) -> float:
        return self.tol * max(1.0, float(want.detach().float().abs().max()))

    def assert_close(self, got: torch.Tensor, want: torch.Tensor) -> None:
        got, want = got.detach().float().cpu(), want.detach().float().cpu()
        torch.testing.assert_close(got, want, rtol=0, atol=self.atol(want))

    def differs(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether a and b differ by far more than the tolerance (a check's teeth)."""
        return float((a.detach().float() - b.detach().float()).abs().max()) > max(1e-3, 5 * self.atol(b))


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _case(device: str, dtype: torch.dtype, tol: float) -> object:
    marks = [pytest.mark.device] + ([_NO_CUDA] if device == "cuda" else [])
    return pytest.param(DeviceCase(device, dtype, tol), marks=marks, id=f"{device}-{str(dtype)[6:]}")


# every device the runtime claims, in the dtypes served there: `pytest -m device` runs only these cases
DEVICE_CASES = [_case("cpu", torch.float32, 1e-5), _case("cpu", torch.bfloat16, 0.03),
                _case("cuda", torch.float32, 1e-4), _case("cuda", torch.bfloat16, 0.03),
                _case("cuda", torch.float16, 0.01)]
FLOAT32_CASES = [p for p in DEVICE_CASES if p.values[0].exact]  # greedy decoding compared token for token


# ---- split configs and artifacts -----------------------------------------------------------------------------


def write_config(path: Path, base: Path, experts: dict[str, Path], shared: dict, exclusive: dict,
                 **extra) -> Path:
    cfg = {"base": str(base), "experts": [{"name": n, "path": str(p)} for n, p in experts.items()],
           "shared": shared, "exclusive": exclusive, **extra}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def copy_artifact(src: Path, dst: Path) -> Path:
    """A private copy of a session artifact, so a test can install a router without touching the original."""
    shutil.copytree(src, dst)
    return dst


def core_plus_expert(art: Artifact, name: str):
    """PeftModel.from_pretrained(core, experts/<name>) with the expert's dense deltas added to the core."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    core = AutoModelForCausalLM.from_pretrained(art.core_dir, dtype=torch.float32).eval()
    params = dict(core.named_parameters())
    with torch.no_grad():
        for k, d in art.load_dense(name).items():
            params[k].add_(d)
    return PeftModel.from_pretrained(core, art.expert_dir(name)).eval()


# ---- faults injected into a runtime ---------------------------------------------------------------------------


EXTREME = torch.tensor([1e20, 0.0, 0.0])  # squares overflow float32 inside the model: NaN logits (1e30 here
# overflows further, to the point where RMSNorm's rsqrt(inf) = 0 zeroes the logits: finite, nothing to detect)


class Poison:
    """Makes the second decoder layer raise when `condition(input_ids)` holds for the forward's input ids, so the
    first layer has already appended to the KV cache when it does."""

    def __init__(self, tm: TwinModel, condition, error: Exception | None = None) -> None:
        self.condition, self.error, self.armed, self.raised = condition, error or RuntimeError("poisoned row"), False, 0
        inner = tm.model.model
        self.handles = [inner.embed_tokens.register_forward_pre_hook(self._look),
                        inner.layers[1].register_forward_pre_hook(self._fire)]

    def _look(self, _module, args) -> None:
        self.armed = bool(self.condition(args[0]))  # args[0]: input ids [B, T]

    def _fire(self, _module, _args) -> None:
        if self.armed:
            self.raised += 1
            raise self.error

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def carries(token: int, phase: str):
    """The condition: `token` is in the input of a decode step (T = 1) or of a prefill (T > 1)."""
    return lambda ids: (ids.shape[1] == 1) == (phase == "decode") and bool((ids == token).any())


# ---- routing data ----------------------------------------------------------------------------------------------


WORDS = ["cat", "dog", "paris", "hello", "world", "python", "sum", "fox", "lazy"]


def write_word_suite(root: Path, n: int = 3) -> Path:
    """A task suite with one task per session expert, `n` examples per split: prompts and answers made of
    WORDS (the tiny models score 0 on it; what it checks is which arms run, not their quality)."""
    for t, task in enumerate(EXPERTS):
        (root / task).mkdir(parents=True)
        for split_name in ("train", "validation", "test"):
            rows = [{"task": task, "messages": [{"role": "user", "content": f"{task} {WORDS[(i + t) % 9]} " * (1 + i)}],
                     "answer": WORDS[(2 * i + t) % 9]} for i in range(n)]
            write_jsonl(root / task / f"{split_name}.jsonl", rows)
    (root / "suite.json").write_text(json.dumps({"format": "twinrt-tasks/1", "tasks": [
        {"name": t, "metric": "exact"} for t in EXPERTS]}))
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prompts_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    return write_jsonl(path, [{"text": t, "expert": e} for t, e in make_prompts(n, seed)])


def examples(n: int, seed: int = 0):
    """make_prompts as router Examples (line numbers from 1)."""
    from router.data import Example

    return [Example(t, e, i) for i, (t, e) in enumerate(make_prompts(n, seed), start=1)]


# ---- live servers ----------------------------------------------------------------------------------------------


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def start(opts: ServeOptions) -> ThreadedServer:
    """A live server for `opts` on a background thread."""
    from serving.server import ThreadedServer, build_server

    live = ThreadedServer(build_server(opts))
    live.start()
    return live
