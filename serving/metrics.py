"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

    twinrt_requests_total{endpoint, arm, status}      completion requests by outcome (ok | cancelled | error)
    twinrt_errors_total{status}                       responses with an error status (4xx, 5xx)
    twinrt_request_latency_seconds{arm}               arrival to last token
    twinrt_time_to_first_token_seconds{arm}           arrival to first token
    twinrt_tokens_total{arm, kind}                    kind = prompt | completion
    twinrt_expert_weight_sum{arm, expert}             Σ of the mix weight given to each expert; divided by
                                                      twinrt_requests_total it is the mean weight
    twinrt_queued / twinrt_running                    generations waiting for a batch slot / in the batch
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self, queued: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("twinrt_requests", "completion requests", ["endpoint", "arm", "status"], registry=r)
        self.errors = Counter("twinrt_errors", "responses with an error status", ["status"], registry=r)
        self.latency = Histogram("twinrt_request_latency_seconds", "arrival to last token", ["arm"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("twinrt_time_to_first_token_seconds", "arrival to first token", ["arm"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("twinrt_tokens", "tokens processed", ["arm", "kind"], registry=r)
        self.weight = Counter("twinrt_expert_weight_sum", "sum of mix weights per expert", ["arm", "expert"],
                              registry=r)
        Gauge("twinrt_queued", "generations waiting for a batch slot", registry=r).set_function(queued)
        Gauge("twinrt_running", "generations in the running batch", registry=r).set_function(running)

    def observe(self, endpoint: str, arm: str, status: str, weights: Mapping[str, float], prompt_tokens: int,
                completion_tokens: int, latency: float, ttft: float | None) -> None:
        self.requests.labels(endpoint, arm, status).inc()
        self.latency.labels(arm).observe(latency)
        if ttft is not None:
            self.ttft.labels(arm).observe(ttft)
        self.tokens.labels(arm, "prompt").inc(prompt_tokens)
        self.tokens.labels(arm, "completion").inc(completion_tokens)
        for expert, w in weights.items():
            self.weight.labels(arm, expert).inc(w)

    def render(self) -> bytes:
        return generate_latest(self.registry)
