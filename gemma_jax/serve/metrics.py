"""Prometheus metrics of one engine, in their own registry; the compile count is the process's.

`gemma_jax_compiles_total` counts JAX's backend-compile events: one per executable built, whether XLA
compiled it or loaded it from the persistent compilation cache, i.e. every miss of a jit's in-memory
cache, whichever function (a model step, an eager op) caused it. Counting events needs no list of the
jitted functions to watch, and a cache hit (the steady state) costs nothing.
"""

from __future__ import annotations

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = 0


def _count(event: str, duration: float, **kwargs) -> None:
    global _compiles
    if event == _BACKEND_COMPILE:
        _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_count)


def compiles() -> int:
    """Executables this process has built (compiled or loaded from the persistent cache) so far."""
    return _compiles


class _Compiles:
    """A collector reading the process-wide count at each scrape."""

    def collect(self):
        yield CounterMetricFamily(
            "gemma_jax_compiles",
            "XLA executables built by this process (a new program: should stay flat).",
            value=compiles(),
        )


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """What an operator watches: load (queue depth, active slots), latency (time to first token) and speed."""

    def __init__(self, slots: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        r.register(_Compiles())
        Gauge("gemma_jax_slots", "Decode slots (rows of the running batch).", registry=r).set(slots)
        self.queue_depth = Gauge("gemma_jax_queue_depth", "Requests waiting for a free decode slot.", registry=r)
        self.active_slots = Gauge("gemma_jax_active_slots", "Decode slots holding a request.", registry=r)
        self.time_to_first_token = Histogram(
            "gemma_jax_time_to_first_token_seconds",
            "From submission to the first sampled token (queueing and prefill included).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "gemma_jax_request_latency_seconds",
            "From submission to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("gemma_jax_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("gemma_jax_generation_tokens", "Tokens sampled.", registry=r)
        self.tokens_per_second = Gauge(
            "gemma_jax_generation_tokens_per_second",
            "Tokens sampled per second by the last decode call (all slots together).",
            registry=r,
        )
        self.requests = Counter(
            "gemma_jax_requests",
            "Finished requests by finish reason (stop, length, cancelled, error).",
            ["finish_reason"],
            registry=r,
        )
