"""Prometheus metrics of one server, in a registry of its own (GET /metrics).

Compilations are counted from JAX's own compile events, split by phase: after warm-up the
"serving" count must stay at zero (every program was built before the server said ready).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from phi3_jax.engine import Engine

# Latency buckets in seconds: from a fast CPU decode step to a long queue wait.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Metrics:
    def __init__(self, engine: Engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("phi3_jax_requests", "HTTP requests answered, by endpoint and "
                                "status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("phi3_jax_prompt_tokens", "prompt tokens submitted",
                                     registry=r)
        self.generation_tokens = Counter("phi3_jax_generation_tokens", "tokens generated",
                                         registry=r)
        Gauge("phi3_jax_queue_depth", "requests waiting for a slot",
              registry=r).set_function(lambda: engine.waiting)
        Gauge("phi3_jax_active_slots", "cache rows holding a request",
              registry=r).set_function(lambda: engine.active)
        Gauge("phi3_jax_slots", "cache rows (max_slots)",
              registry=r).set(engine.shapes.max_slots)
        self.finished = Counter("phi3_jax_finished_requests", "engine requests finished, by "
                                "reason (stop, length, cancelled, error)", ["reason"],
                                registry=r)
        self.ttft = Histogram("phi3_jax_time_to_first_token_seconds", "submission to first "
                              "token", buckets=_BUCKETS, registry=r)
        self.itl = Histogram("phi3_jax_inter_token_latency_seconds", "time between a "
                             "request's tokens", buckets=_BUCKETS, registry=r)
        self.compilations = Counter("phi3_jax_compilations", "XLA compilations, by phase "
                                    "(warmup, serving)", ["phase"], registry=r)
        for phase in ("warmup", "serving"):
            self.compilations.labels(phase)  # shown from the start, at zero
        self._phase = "warmup"
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, **kwargs) -> None:
        if name == _COMPILE_EVENT:
            self.compilations.labels(self._phase).inc()

    def warm(self) -> None:
        """Warm-up is over: later compilations count as "serving"."""
        self._phase = "serving"

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def render(self) -> bytes:
        return generate_latest(self.registry)
