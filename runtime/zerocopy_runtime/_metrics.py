"""Replica metrics through Ray's metrics API.

Ray exports them on each node's metrics endpoint with the `ray_` prefix
(`ray_zerocopy_requests_total`, ...), next to Serve's own request metrics, so
the Prometheus that scrapes a Ray cluster picks them up with no extra setup.
"""

from __future__ import annotations

from ray.util import metrics


class ReplicaMetrics:
    """What a replica reports: its attach, its shared bytes, and its requests and errors by handler."""

    def __init__(self, model: str, handler: str) -> None:
        self._tags = {"model": model, "handler": handler}
        keys = ("model", "handler")
        self._attach_seconds = metrics.Gauge(
            "zerocopy_attach_seconds", description="Seconds this replica took to attach to the weights.", tag_keys=keys
        )
        self._shared_bytes = metrics.Gauge(
            "zerocopy_shared_bytes", description="Weight bytes this replica maps from the object store.", tag_keys=keys
        )
        self._requests = metrics.Counter(
            "zerocopy_requests", description="Requests answered, by model and handler.", tag_keys=keys
        )
        self._errors = metrics.Counter(
            "zerocopy_request_errors",
            description="Requests that failed: reason bad_request (HTTP 400) or internal (HTTP 500).",
            tag_keys=(*keys, "reason"),
        )

    def attached(self, seconds: float, shared_bytes: int) -> None:
        self._attach_seconds.set(seconds, tags=self._tags)
        self._shared_bytes.set(shared_bytes, tags=self._tags)

    def request(self, error: str | None = None) -> None:
        """One answered request; `error` is its failure reason, if it failed."""
        self._requests.inc(tags=self._tags)
        if error is not None:
            self._errors.inc(tags={**self._tags, "reason": error})
