"""Prometheus metrics of the worker. Every metric is documented in docs/metrics.md.

Labels are bounded sets only (event type is folded to the known types + "other", reasons come from
`core.schema.REASONS`, Triton codes from gRPC status names); user ids never appear in a label.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from core.schema import KNOWN_EVENT_TYPES

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

MESSAGES_READ = Counter(
    "interest_messages_read_total", "Messages read from the events topic (a batch envelope is one message)."
)
EVENTS_CONSUMED = Counter("interest_events_consumed_total", "Valid events read from the events topic.", ["event_type"])
EVENTS_REJECTED = Counter(
    "interest_events_rejected_total", "Messages (or events of an envelope) sent to the dead-letter topic.", ["reason"]
)
DUPLICATES_IGNORED = Counter(
    "interest_duplicates_ignored_total", "Events ignored as repeats of one seen within the lateness horizon."
)
EVENTS_REPLAYED = Counter(
    "interest_events_replayed_total", "Events read again after a crash or rebalance (offset already in the state)."
)
SESSIONS_STARTED = Counter("interest_sessions_started_total", "Events that opened a new session.")
USERS_IN_STATE = Gauge("interest_users_in_state", "Users held in this worker's state table.")
USERS_PENDING = Gauge("interest_users_pending_inference", "Users whose state changed and await inference.")
STATE_BYTES = Histogram(
    "interest_state_bytes",
    "Serialized size of a user's state when written.",
    buckets=(256, 512, 1024, 2048, 4096, 8192, 16384),
)
BATCH_SIZE = Histogram("interest_inference_batch_size", "Sequences per inference request.", buckets=_BATCH_BUCKETS)
INFERENCE_SECONDS = Histogram(
    "interest_inference_duration_seconds", "Wall time of one Triton inference request.", buckets=_LATENCY_BUCKETS
)
TRITON_ERRORS = Counter("interest_triton_errors_total", "Failed Triton requests, by status code.", ["code"])
TRITON_RETRIES = Counter("interest_triton_retries_total", "Triton requests retried after a failure.")
BATCH_FAILURES = Counter(
    "interest_batch_failures_total", "Event batches whose processing failed and is retried (offsets held)."
)
INPUT_GAPS = Counter(
    "interest_input_gaps_total",
    "Times an events partition skipped offsets on the way to the worker and the skipped records were read again.",
)
INPUT_OFFSETS_RESTARTED = Counter(
    "interest_input_offsets_restarted_total",
    "Users whose input offsets went back with events newer than any they had folded (a recreated or mirrored"
    " events topic): the events were applied, not taken for replays.",
)
BATCHES_FENCED = Counter(
    "interest_batches_fenced_total",
    "Batches abandoned because this worker no longer owned their partitions (a rebalance it slept through).",
)
FENCE_CHECK_SECONDS = Histogram(
    "interest_fence_check_seconds",
    "Wall time of one ownership check before a write or send (mostly the Heartbeat round trip to the group"
    " coordinator; two per batch).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
)
FENCE_ROUND_TRIPS = Counter(
    "interest_fence_round_trips_total",
    "Ownership checks that asked the group coordinator (the others ran within a lease: stream/fencing.py).",
)
MESSAGES_ISOLATED = Counter(
    "interest_messages_isolated_total",
    "Messages that failed the batch step on their own and were dead-lettered with reason internal.",
)
CIRCUIT_OPEN = Gauge("interest_triton_circuit_open", "1 while the Triton circuit breaker is open, else 0.")
OUTPUTS_PUBLISHED = Counter("interest_outputs_published_total", "Interest records published to the output topic.")
OUTPUTS_REPUBLISHED = Counter(
    "interest_outputs_republished_total", "Stored records published again, byte for byte, after a replay."
)
USERS_FORGOTTEN = Counter(
    "interest_users_forgotten_total", "Users erased by a forget message (state, record and output tombstoned)."
)
WORKER_DEGRADED = Gauge("interest_worker_degraded", "1 while /health says degraded (inference failing or stalled).")
EVENT_TO_OUTPUT_SECONDS = Histogram(
    "interest_event_to_output_seconds",
    "From an event's Kafka record timestamp (when it was produced) to its user's published update.",
    buckets=_LATENCY_BUCKETS,
)
EVENT_TIME_LAG_SECONDS = Histogram(
    "interest_event_time_to_output_seconds",
    "From an event's own timestamp to its user's published update (event time; large for replays).",
    buckets=(*_LATENCY_BUCKETS, 300, 3600, 86400),
)
CONSUMER_LAG = Gauge(
    "interest_consumer_lag_messages", "End offset minus committed offset of the events topic.", ["partition"]
)
BUILD_INFO = Info("interest_worker", "Worker and model versions.")
MODEL_VERSION = Gauge(
    "interest_model_version_info",
    "1 for the served model version this worker uses (Triton's version number, the model's own version name).",
    ["version", "model_version"],
)
MODEL_VERSIONS_REFUSED = Counter(
    "interest_model_versions_refused_total",
    "Ready model versions the worker refused: their inputs/outputs or bundle do not match its encoder.",
    ["version"],
)
_build_info: dict[str, str] = {"worker_version": "", "model_name": "", "model_version": ""}


def set_build_info(**fields: str) -> None:
    """Update some fields of `interest_worker_info` (the model fields change when the worker switches versions)."""
    _build_info.update(fields)
    BUILD_INFO.info(_build_info)


def event_type_label(event_type: str) -> str:
    return event_type if event_type in KNOWN_EVENT_TYPES else "other"


_lag_partitions: set[int] = set()


def set_consumer_lag(lags: dict[int, int]) -> None:
    """The lag of the events partitions this worker holds now; partitions it no longer holds (revoked in a
    rebalance) lose their series, so a dashboard never sums a lag that another worker reports."""
    for partition in _lag_partitions - lags.keys():
        CONSUMER_LAG.remove(str(partition))
    for partition, lag in lags.items():
        CONSUMER_LAG.labels(str(partition)).set(lag)
    _lag_partitions.clear()
    _lag_partitions.update(lags)
