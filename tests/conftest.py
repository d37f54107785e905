"""Shared fixtures: tiny random Llama models, experts, and split artifacts built once per session (the routed
artifact of the serving tests once per module). Plain helpers are in helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: more threads only fight over a shared CPU
sys.path.insert(0, str(Path(__file__).parent))

from transformers.utils import logging as hf_logging  # noqa: E402

from helpers import EXPERTS, examples, write_config  # noqa: E402
from tiny import make_base, make_full_expert, make_lora_expert  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base/, three full experts, and LoRA adapters (+ their merged full checkpoints) over the base."""
    root = tmp_path_factory.mktemp("tiny")
    make_base(root / "base")
    paths = {"root": root, "base": root / "base"}
    for i, name in enumerate(EXPERTS):
        make_full_expert(root / "base", root / name, seed=100 + i)
        paths[name] = root / name
    make_lora_expert(root / "base", root / "lora_a", root / "lora_a_merged", seed=7)
    make_lora_expert(root / "base", root / "lora_b", root / "lora_b_merged", seed=8, r=6,
                     rank_pattern={"down_proj": 2})
    for k in ("lora_a", "lora_a_merged", "lora_b", "lora_b_merged"):
        paths[k] = root / k
    return paths


@pytest.fixture(scope="session")
def tiny_artifact(tiny_models, tmp_path_factory) -> Path:
    """A twin artifact of the three full experts: TIES core, rank 4 factors (GQA k/v are 16 wide)."""
    from twinrt.config import load_config
    from twinrt.split.run import split

    root = tmp_path_factory.mktemp("art")
    cfg = write_config(root / "split.yaml", tiny_models["base"], {n: tiny_models[n] for n in EXPERTS},
                       {"method": "ties", "density": 0.5}, {"rank": 4})
    split(load_config(cfg), root / "artifact")
    return root / "artifact"


@pytest.fixture(scope="session")
def tiny_artifact_full_rank(tiny_models, tmp_path_factory) -> Path:
    """The same experts at full rank (every factored matrix keeps all singular values)."""
    from twinrt.config import load_config
    from twinrt.split.run import split

    root = tmp_path_factory.mktemp("art_full")
    cfg = write_config(root / "split.yaml", tiny_models["base"], {n: tiny_models[n] for n in EXPERTS},
                       {"method": "task_arithmetic", "scaling": 0.3}, {"rank": 32})
    split(load_config(cfg), root / "artifact")
    return root / "artifact"


@pytest.fixture(scope="module")
def routed_artifact(tiny_models, tmp_path_factory):
    """A tiny artifact whose experts are far enough apart that every arm's greedy output differs (the session's
    `tiny_artifact` experts are 5% perturbations: on this random model all arms decode the same tokens, which
    would let a test of mixes pass vacuously), with a prototype (MiniLM) router installed."""
    from router import TrainConfig, save_router, train_router
    from twinrt.artifact import Artifact
    from twinrt.config import parse_config
    from twinrt.split.run import split

    root = tmp_path_factory.mktemp("serve")
    for i, name in enumerate(EXPERTS):
        make_full_expert(tiny_models["base"], root / name, seed=100 + i, scale=0.5)
    cfg = parse_config({"base": str(tiny_models["base"]),
                        "experts": [{"name": n, "path": str(root / n)} for n in EXPERTS],
                        "shared": {"method": "ties", "density": 0.5}, "exclusive": {"rank": 4}})
    split(cfg, root / "artifact")
    art = Artifact.open(root / "artifact")
    out = train_router(art, examples(8, seed=0), TrainConfig(kind="prototype", holdout=0.0))
    save_router(out.router, art)
    return art.path
