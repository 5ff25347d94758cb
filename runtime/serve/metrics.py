"""Prometheus metrics (one registry per app) and their endpoint labels."""

from __future__ import annotations

class Metrics:
    """Prometheus metrics in a registry of their own (one per app, so tests can build many)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("edgekiln_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("edgekiln_request_latency_seconds", "HTTP request latency by endpoint", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch_size = Histogram("edgekiln_batch_size", "Images per model call (dynamic batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry)
        self.inference = Histogram("edgekiln_inference_seconds", "Model call duration",
                                   buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                   registry=self.registry)
        self.queue_depth = Gauge("edgekiln_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.images = Counter("edgekiln_images", "Images (tensor rows) inferred", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def endpoint_label(path: str) -> str:
    """A bounded set of label values (paths hold model names)."""
    if path.startswith("/v2/models/"):
        if path.endswith("/infer"):
            return "infer"
        return "model_ready" if path.endswith("/ready") else "model_metadata"
    if path.startswith("/v2/health/"):
        return "health"
    return {"/v1/classify": "classify", "/metrics": "metrics", "/v2": "server_metadata"}.get(path, "other")
