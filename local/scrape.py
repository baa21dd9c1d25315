"""Read a worker's Prometheus page into plain numbers (the demo's live view and the pipeline benchmark)."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Snapshot:
    """The worker's counters at one moment (from its /metrics page)."""

    at: float
    consumed: float = 0.0
    rejected: float = 0.0
    duplicates: float = 0.0
    outputs: float = 0.0
    pending: float = 0.0
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count)
    batches: float = 0.0  # inference requests
    sequences: float = 0.0  # sequences in them
    batch_failures: float = 0.0
    fence_checks: float = 0.0  # ownership checks before writes and sends (stream/fencing.py)
    fence_seconds: float = 0.0  # their summed wall time

    @classmethod
    def scrape(cls, metrics_url: str) -> Snapshot:
        snap = cls(at=time.monotonic())
        try:
            with urllib.request.urlopen(metrics_url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return snap
        buckets = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "interest_events_consumed_total":
                    snap.consumed += s.value
                elif s.name == "interest_events_rejected_total":
                    snap.rejected += s.value
                elif s.name == "interest_duplicates_ignored_total":
                    snap.duplicates += s.value
                elif s.name == "interest_outputs_published_total":
                    snap.outputs = s.value
                elif s.name == "interest_users_pending_inference":
                    snap.pending = s.value
                elif s.name == "interest_inference_batch_size_count":
                    snap.batches = s.value
                elif s.name == "interest_inference_batch_size_sum":
                    snap.sequences = s.value
                elif s.name == "interest_batch_failures_total":
                    snap.batch_failures = s.value
                elif s.name == "interest_fence_check_seconds_count":
                    snap.fence_checks = s.value
                elif s.name == "interest_fence_check_seconds_sum":
                    snap.fence_seconds = s.value
                elif s.name == "interest_event_to_output_seconds_bucket":
                    buckets.append((float(s.labels["le"]), s.value))
        snap.latency_buckets = tuple(sorted(buckets))
        return snap

    @property
    def handled(self) -> float:
        return self.consumed + self.rejected + self.duplicates


def histogram_quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (le, count) buckets: linear within the bucket."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank, prev_le, prev_count = q * buckets[-1][1], 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return prev_le
