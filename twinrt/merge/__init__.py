"""Shared-core merge methods (pure functions) and their registry."""

from twinrt.merge.registry import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "get_method"]
