"""Shared-core merge methods (pure functions), their registry, and the merge of one named tensor."""

from twinrt.merge.registry import METHODS, Merged, MergeMethod, MethodParams, get_method
from twinrt.merge.stats import KINDS, TensorStats
from twinrt.merge.tensor import merge_tensor, tensor_seed

__all__ = ["KINDS", "METHODS", "Merged", "MergeMethod", "MethodParams", "TensorStats", "get_method", "merge_tensor",
           "tensor_seed"]
