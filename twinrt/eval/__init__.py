"""Evaluation of experts, static merges and the twin: task metrics and A/B table arithmetic."""

from twinrt.eval.metrics import METRICS, NormalizedTable, get_metric, normalized_scores, task_score

__all__ = ["METRICS", "NormalizedTable", "get_metric", "normalized_scores", "task_score"]
