"""Prometheus metrics of the service, named after Triton's where one exists.

`histocsc_inference_count_total / histocsc_inference_exec_count_total` is the mean batch size
(Triton: nv_inference_count / nv_inference_exec_count).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The counters, histograms and gauges of one server, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("histocsc_http_requests", "HTTP requests by route and outcome",
                                ["route", "method", "status"], registry=r)
        self.inference_requests = Counter(
            "histocsc_inference_requests", "Inference requests by outcome (success, failure)",
            ["outcome"], registry=r)
        self.inference_count = Counter(
            "histocsc_inference_count", "Tiles inferred through /v2 (batch items)", registry=r)
        self.exec_count = Counter(
            "histocsc_inference_exec_count", "Model executions of the dynamic batcher",
            registry=r)
        self.queue_seconds = Histogram(
            "histocsc_queue_duration_seconds", "Time a request waited in the batcher queue",
            buckets=SECONDS, registry=r)
        self.compute_seconds = Histogram(
            "histocsc_compute_duration_seconds", "Time of one model execution (one batch)",
            buckets=SECONDS, registry=r)
        self.tiles = Counter("histocsc_tiles_processed", "Tiles processed, by source (infer, job)",
                             ["source"], registry=r)
        self.jobs = Gauge("histocsc_jobs", "Slide jobs by state", ["state"], registry=r)

    def watch_jobs(self, states: tuple[str, ...], count: Callable[[str], int]) -> None:
        """Read the number of jobs in each state from the store at scrape time."""
        for state in states:
            self.jobs.labels(state=state).set_function(lambda s=state: count(s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
