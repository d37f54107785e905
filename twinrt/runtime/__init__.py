"""The fused runtime: per-row expert mixing inside batched generation."""

from twinrt.runtime.constraint import TokenConstraint
from twinrt.runtime.engine import Engine
from twinrt.runtime.model import TwinModel
from twinrt.runtime.planning import MixPolicy, Plan
from twinrt.runtime.request import Request, SamplingParams, TokenLogprob
from twinrt.runtime.runner import Runner

__all__ = ["Engine", "MixPolicy", "Plan", "Request", "Runner", "SamplingParams", "TokenConstraint", "TokenLogprob",
           "TwinModel"]
