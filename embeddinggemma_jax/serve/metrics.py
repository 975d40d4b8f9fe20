"""Prometheus metrics of one server, in a registry of its own (two servers in one process never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from embeddinggemma_jax.batching import padding_efficiency
from embeddinggemma_jax.serve.schemas import TIERS

# Request latency buckets (seconds): a 16-token query on a CPU takes tens of milliseconds, a
# 2,048-token document a few seconds, and a loaded queue adds to both.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "embeddinggemma"
        self.requests = Counter(f"{p}_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.latency = Histogram(f"{p}_request_duration_seconds", "Time from a request's arrival to its answer",
                                 ["route", "tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter(f"{p}_inputs", "Texts embedded, by tier", ["tier"], registry=r)
        self.tokens = Counter(f"{p}_tokens", "Real tokens embedded (prompt, <bos> and <eos> included), by tier",
                              ["tier"], registry=r)
        self.batches = Counter(f"{p}_batches", "Device steps run", registry=r)
        self.batch_tokens = Counter(f"{p}_batch_real_tokens", "Real tokens in the batches run", registry=r)
        self.batch_padded = Counter(f"{p}_batch_padded_tokens", "Padded tokens (rows x length) of the batches run",
                                    registry=r)
        self.padding_efficiency = Gauge(f"{p}_padding_efficiency",
                                        "Real tokens / padded tokens over every batch since start", registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Texts waiting for the device, by tier", ["tier"], registry=r)
        self.rejected = Counter(f"{p}_queue_rejections", "Requests refused because the queue was full", ["tier"],
                                registry=r)
        self.disconnects = Counter(f"{p}_client_disconnects", "Requests whose client went away before the answer "
                                   "(counted as status 499 in embeddinggemma_requests, not as errors)", ["route"],
                                   registry=r)
        self.limited = Counter(f"{p}_limit_rejections", "Requests refused by a size or in-flight limit, by the "
                               "limit's flag", ["limit"], registry=r)
        self.dropped = Counter(f"{p}_dropped_texts", "Texts removed from the queue before the device because "
                               "their client disconnected", registry=r)
        self._totals = (0, 0)  # real, padded tokens (the gauge's inputs; the counters cannot be read back)
        for t in TIERS:
            self.queue_depth.labels(t).set(0)
            self.inputs.labels(t)
            self.tokens.labels(t)

    def batch_done(self, real: int, padded: int) -> None:
        self.batches.inc()
        self.batch_tokens.inc(real)
        self.batch_padded.inc(padded)
        self._totals = (self._totals[0] + real, self._totals[1] + padded)
        self.padding_efficiency.set(padding_efficiency(*self._totals))

    def render(self) -> bytes:
        return generate_latest(self.registry)
