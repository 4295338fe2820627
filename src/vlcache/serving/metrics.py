"""The server's Prometheus metrics (one registry per app, so tests and several apps in a process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .scheduler import Stats

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics(Stats):
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("vlcache_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.states = Counter("vlcache_state_lookups", "image state lookups by result", ["result"], registry=self.registry)
        self.hot_bytes = Gauge("vlcache_hot_bytes", "bytes of image states held in memory", registry=self.registry)
        self.hot_states = Gauge("vlcache_hot_states", "image states held in memory", registry=self.registry)
        self.ttft = Histogram("vlcache_time_to_first_token_seconds", "time from request to first token", registry=self.registry,
                              buckets=SECONDS)
        self.running = Gauge("vlcache_running_rows", "rows decoding in the batch", registry=self.registry)
        self.queued = Gauge("vlcache_queued_requests", "questions waiting for a row or in prefill", registry=self.registry)
        self.rejected = Counter("vlcache_rejected_requests", "requests refused with 429 (queue full)", registry=self.registry)
        self.wait = Histogram("vlcache_queue_wait_seconds", "time from request to the start of its prefill",
                              registry=self.registry, buckets=SECONDS)
        self.batch = Histogram("vlcache_batch_size", "rows in each decode step", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.uploads = Counter("vlcache_state_uploads", "cache files uploaded by clients (--server)", registry=self.registry)
        self.kv_blocks = Gauge("vlcache_kv_blocks", "K/V blocks per attention layer kind: used (held by rows, states or "
                               "kept conversations), free (allocated, not held), shared (more than one holder), kept "
                               "(held by the kept conversations' prefix tree)", ["kind", "state"], registry=self.registry)
        self.write_errors = Gauge("vlcache_state_write_errors", "states that could not be written to --cache-dir "
                                  "(disk full, read-only) and are served from memory only", registry=self.registry)

    def queue_wait(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def batch_size(self, rows: int) -> None:
        self.batch.observe(rows)
