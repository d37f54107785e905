"""Evaluation of experts, static merges and the twin: task metrics and A/B table arithmetic.

    metrics.py     metric registry, task scores, normalized-score arithmetic
    tasks.py       a task suite on disk (suite.json + <task>/<split>.jsonl)
    weights.py     original experts and static merges, streamed tensor by tensor from base + experts
    generation.py  batched greedy decoding of every arm through twinrt's Engine
    grid.py        the merge parameter grids searched on validation
    run.py         `run_eval`: every arm on every task's test split
    report.py      the table: rich, eval.json, eval.md, eval.png
    cli.py         `twinrt eval ARTIFACT --tasks DIR`

Only the metrics are imported here; the rest loads torch and transformers and is imported where used.
"""

from twinrt.eval.metrics import METRICS, NormalizedTable, get_metric, normalized_scores, task_score

__all__ = ["METRICS", "NormalizedTable", "get_metric", "normalized_scores", "task_score"]
