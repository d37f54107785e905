#!/usr/bin/env bash
# Train one expert per task of the suite over SmolLM2-135M-Instruct. Run from the repository root:
#   bash examples/experts/train_all.sh [--full] [OUT_ROOT]
# Without --full it reproduces the committed demo LoRA adapters (default OUT_ROOT examples/experts/lora).
# With --full it writes full fine-tuned float32 checkpoints (513 MiB each, not committed; default OUT_ROOT
# examples/experts/full, which git ignores), for the full fine-tuned table of docs/RESULTS.md.
# Every run is seeded (data order, LoRA init); the suite itself is regenerated from its fixed seed first.
# Steps per task are the fewest that got the expert to >= 90% validation accuracy here (see examples/README.md).
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-.venv/bin/python}
MODE=lora
if [[ ${1:-} == --full ]]; then MODE=full; shift; fi
OUT=${1:-examples/experts/$MODE}
THREADS=${THREADS:-1}   # torch threads: 1 is fastest on a busy 2-core machine, 2 on an idle one
# extra train_expert flags for every task, e.g. TRAIN_ARGS=--no-bf16 on a CPU without native bf16 matmuls
# (there bf16 autocast is tens of times slower than float32; the experts then differ in the last bits)
read -r -a EXTRA <<< "${TRAIN_ARGS:-}"

"$PY" -m examples.tasks.make_tasks --out examples/tasks
if [[ $MODE == lora ]]; then
    declare -A STEPS=([date_us]=50 [date_iso]=50 [price_us]=80 [price_de]=80 [number_words]=80 [capital]=40)
    ARGS=(--lr 2e-3 --rank 8 --alpha 16 --save-dtype bfloat16)
else
    declare -A STEPS=([date_us]=50 [date_iso]=50 [price_us]=80 [price_de]=80 [number_words]=80 [capital]=40)
    ARGS=(--lr 1e-4 --save-dtype float32)
fi
for task in date_us date_iso price_us price_de number_words capital; do
    start=$SECONDS
    "$PY" -m examples.experts.train_expert --task "$task" --mode "$MODE" --steps "${STEPS[$task]}" \
        --seed 0 --batch-size 8 --threads "$THREADS" "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"} --out "$OUT/$task" --overwrite
    echo "== $task: $((SECONDS - start))s"
done
