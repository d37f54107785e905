#!/usr/bin/env bash
# The GPU check in one script, for a bare machine with an NVIDIA GPU, PyTorch, Triton and transformers
# installed and no package index: twinrt installed from this tree (plus the wheels benchmarks/gpu/wheels.sh put
# in .whl/, where the machine lacks them), the runtime's device tests, then the fused-runtime benchmark on random
# Llamas of three shapes and the engine end to end. Writes OUT/run.log, OUT/device-tests.txt, OUT/gpu.json (every
# stage's rows) and OUT/summary.md; each stage has a time limit, so the whole run ends within about 8 minutes.
# With the device tool: carry .whl (git-ignored), e.g. `bash benchmarks/gpu/run.sh $OUT` with carry [".whl"].
#
#     bash benchmarks/gpu/run.sh OUT                         # on the GPU machine
#     bash benchmarks/gpu/run.sh OUT --device cpu --quick    # the same steps here, small
#
# PYTHON: the interpreter to use (default python3).
set -uo pipefail
usage="usage: bash benchmarks/gpu/run.sh OUT [--device cuda|cpu] [--quick]"
OUT=${1:?$usage}
shift
DEVICE=cuda
QUICK=0
while (($#)); do
    case $1 in
        --device) DEVICE=${2:?$usage}; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "run.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
mkdir -p "$OUT/parts"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec > >(tee "$OUT/run.log") 2>&1
start=$SECONDS
say() { echo "[run.sh $((SECONDS - start)) s] $*"; }

# ---- 1. twinrt from this tree, without network --------------------------------------------------------------
if ! "$PY" -c "import pydantic" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { say "pydantic is missing and .whl/ is empty: run benchmarks/gpu/wheels.sh"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/twinrt-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/twinrt-site${PYTHONPATH:+:$PYTHONPATH}
    say "installed .whl/ into /tmp/twinrt-site"
fi
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/tmp/twinrt-install.log 2>&1; then
    cat /tmp/twinrt-install.log
    say "pip install -e . failed (above); running from the tree"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - "$DEVICE" <<'EOF' || exit 1
import sys, platform, torch, transformers, twinrt
dev = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"twinrt from {twinrt.__file__}")
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
EOF

# ---- 2. the device tests (every device present; CUDA cases skip without one) ------------------------------------
say "device tests"
"$PY" -c "import pytest, peft" 2>/dev/null || say "pytest or peft is missing: the device tests need both"
timeout 120 "$PY" -m pytest -q -m device -p no:cacheprovider -o addopts="" tests/test_runtime.py \
    tests/test_sparse_mixing.py tests/test_packed.py tests/test_engine_chunked.py -rfs 2>&1 | tee "$OUT/device-tests.txt"
say "device tests: exit ${PIPESTATUS[0]}"

# ---- 3. the benchmark -----------------------------------------------------------------------------------------
bench() {  # bench SECONDS NAME ARGS...: one stage, its JSON in OUT/parts/NAME.json
    local secs=$1 name=$2
    shift 2
    say "bench $name ($secs s at most): $*"
    timeout "$secs" "$PY" benchmarks/bench_fusion.py --random-weights --device "$DEVICE" --out "$OUT/parts/$name.json" \
        "$@"
    say "bench $name: exit $?"
}
if ((QUICK)); then
    bench 300 kernels-quick --shape smollm2-135m --layers 2 --dtype float32 --ns 4 16 --ranks 16 --batches 1 8 \
        --repeats 1 --reference-batches 8
    bench 200 engine-quick --shape smollm2-135m --layers 2 --dtype float32 --skip-kernels --e2e --ns 16 --ranks 16 \
        --e2e-requests 8 --e2e-tokens 16 --e2e-repeats 1
else  # the README's cells first (8B decode), then the engine, then the smaller shapes; about 7 minutes in all
    bench 120 kernels-llama-8b --shape llama-8b --ns 4 64 --ranks 16 --batches 64 256 --routings top1 dense \
        --phases decode --repeats 2 --reference-batches 64 --max-launches 5000
    bench 90 engine-llama-8b --shape llama-8b --skip-kernels --e2e --ns 64 --ranks 16 --e2e-requests 64 \
        --e2e-tokens 128 --e2e-repeats 1
    bench 50 kernels-smollm2-135m --shape smollm2-135m --ns 4 64 --ranks 16 --batches 1 64 256 \
        --routings top1 dense --phases decode --repeats 2 --reference-batches 64 --max-launches 5000
    bench 40 kernels-llama-1b --shape llama-1b --ns 4 64 --ranks 16 64 --batches 64 --routings top1 dense \
        --phases decode --repeats 2 --reference-batches --max-launches 5000
    bench 45 kernels-llama-8b-prefill --shape llama-8b --ns 4 64 --ranks 16 --batches 64 --routings top1 dense \
        --phases prefill --repeats 2 --reference-batches --max-launches 5000
fi

# ---- 4. one JSON and a summary --------------------------------------------------------------------------------
"$PY" benchmarks/gpu/collect.py "$OUT" && rm -rf "$OUT/parts"
say "done: $OUT"
