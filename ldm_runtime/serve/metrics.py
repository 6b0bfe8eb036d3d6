"""Prometheus metrics of one server, on its own ``CollectorRegistry`` (several servers in one process never collide)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """What ``/metrics`` reports: requests by route and status, queue depth, jobs in flight, queue-wait and
    generation-time histograms, rejections, cancellations and images generated."""

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ldm_requests", "HTTP requests answered", ("route", "status"), registry=r)
        Gauge("ldm_queue_depth", "jobs waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("ldm_in_flight", "jobs generating now", registry=r).set_function(in_flight)
        self.queue_wait = Histogram("ldm_queue_wait_seconds", "time a job waited for a slot", buckets=SECONDS,
                                    registry=r)
        self.generation = Histogram("ldm_generation_seconds", "time of one (batched) pipeline call",
                                    buckets=SECONDS, registry=r)
        self.rejections = Counter("ldm_rejections", "jobs refused because every slot and the queue were full",
                                  registry=r)
        self.cancellations = Counter("ldm_cancellations", "jobs cancelled (client gone, interrupt, timeout)",
                                     registry=r)
        self.images = Counter("ldm_images_generated", "images returned to clients", ("kind",), registry=r)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
