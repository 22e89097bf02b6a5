"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own.

Label values come from fixed sets only (route templates, error codes, drop reasons), so a client sending
random paths cannot grow the series without bound.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's counters, gauges and histograms.

    Args:
        depth: returns the number of requests waiting for the worker (read at scrape time).
        capacity: the queue's size.
        max_batch: rows per pipeline call at most.
    """

    def __init__(self, depth: Callable[[], int], capacity: int, max_batch: int):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("taiyi_queue_depth", "Requests waiting for the model worker.", registry=r)
        self.queue_depth.set_function(lambda: float(depth()))
        Gauge("taiyi_queue_capacity", "Requests the queue holds before answering 429.", registry=r).set(capacity)
        Gauge("taiyi_max_batch", "Most image rows computed in one pipeline call.", registry=r).set(max_batch)
        self.in_flight = Gauge("taiyi_requests_in_flight", "HTTP requests being handled.", registry=r)
        self.requests = Counter(
            "taiyi_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "taiyi_request_duration_seconds",
            "Time from request arrival to answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("taiyi_errors", "Error responses, by error code.", ["code"], registry=r)
        self.batch_rows = Histogram(
            "taiyi_batch_rows", "Image rows per pipeline call, by kind.", ["kind"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "taiyi_batch_requests",
            "Requests served by one pipeline call, by kind.",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "taiyi_compute_seconds",
            "Time of one pipeline call, by kind.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.wait = Histogram(
            "taiyi_queue_wait_seconds", "Time a request waited for the worker.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("taiyi_images", "Images returned.", registry=r)
        self.drops = Counter(
            "taiyi_dropped_requests",
            "Requests not computed or whose result was thrown away, by reason "
            "(abandoned: client gone or timed out while queued; aborted: while computing; shutdown).",
            ["reason"],
            registry=r,
        )

    # WorkerMetrics
    def batch(self, kind: str, rows: int, jobs: int, seconds: float) -> None:
        self.batch_rows.labels(kind).observe(rows)
        self.batch_requests.labels(kind).observe(jobs)
        self.compute.labels(kind).observe(seconds)

    def queue_wait(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def dropped(self, reason: str, count: int = 1) -> None:
        self.drops.labels(reason).inc(count)

    # HTTP side
    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
