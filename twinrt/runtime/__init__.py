"""The fused runtime: per-row expert mixing inside batched generation."""

from twinrt.runtime.engine import Engine, Request, SamplingParams
from twinrt.runtime.model import Plan, TwinModel

__all__ = ["Engine", "Plan", "Request", "SamplingParams", "TwinModel"]
