#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the wheels benchmarks/gpu/run.sh installs on a GPU machine that has no
# package index: what twinrt imports beyond the PyTorch / Triton / transformers image it expects there.
# Run it where pip reaches the index. PYVER: that machine's Python (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
rm -rf .whl && mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    plat+=(--platform "$p")
done
# pydantic (the artifact's manifest) and what it needs; keep the versions .venv runs the tests with
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plat[@]}" \
    -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0
du -sh .whl
ls .whl
