#!/usr/bin/env bash
# Reproduce the committed demo experts: examples/experts/lora/<task>/ for every task of the suite.
# Run from the repository root:  bash examples/experts/train_all.sh [OUT_ROOT]   (default examples/experts/lora)
# Every run is seeded (data order, LoRA init); the suite itself is regenerated from its fixed seed first.
# Steps per task are the fewest that got the expert to >= 90% validation accuracy here (see examples/README.md).
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-examples/experts/lora}

"$PY" -m examples.tasks.make_tasks --out examples/tasks
declare -A STEPS=([date_us]=50 [date_iso]=50 [price_us]=80 [price_de]=80 [number_words]=80 [capital]=40)
for task in date_us date_iso price_us price_de number_words capital; do
    start=$SECONDS
    "$PY" -m examples.experts.train_expert --task "$task" --mode lora --steps "${STEPS[$task]}" --lr 2e-3 \
        --seed 0 --rank 8 --alpha 16 --batch-size 8 --save-dtype bfloat16 --threads 1 \
        --out "$OUT/$task" --overwrite
    echo "== $task: $((SECONDS - start))s"
done
