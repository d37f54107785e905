"""The fused runtime: per-row expert mixing inside batched generation."""

from twinrt.runtime.engine import Engine
from twinrt.runtime.model import TwinModel
from twinrt.runtime.planning import MixPolicy, Plan
from twinrt.runtime.request import Request, SamplingParams
from twinrt.runtime.runner import Runner

__all__ = ["Engine", "MixPolicy", "Plan", "Request", "Runner", "SamplingParams", "TwinModel"]
