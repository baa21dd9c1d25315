"""The two wire contracts: events in (schema version 1, strict validation) and interest records out (version 1).

Producers publish one JSON object per message to the events topic, keyed by `user_id`. Validation never
raises to the worker: `parse_event` returns either an `Event` or a `Rejection` whose `reason` is one of a
small fixed set (safe as a metric label) and whose `detail` tells the producer what to fix. The schema is
documented in docs/events.md; `event_json_schema()` emits it as JSON Schema.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Final

import msgspec
from msgspec import Meta

SCHEMA_VERSION: Final = 1

#: Event types the model knows; others that match the pattern are accepted and encoded as "other".
KNOWN_EVENT_TYPES: Final = ("view", "click", "cart", "purchase", "order", "rating", "wishlist", "search")

MIN_TIMESTAMP_MS: Final = 631_152_000_000  # 1990-01-01T00:00:00Z: older is almost surely seconds, not ms

#: Characters an id may not contain: whitespace, C0/DEL/C1 controls, and the invisible format characters (soft
#: hyphen, zero-width and bidi controls, word joiners, BOM) that make two ids print alike yet differ.
#: Patterns end in \Z, not $: msgspec searches with `re`, where $ also matches before a final newline.
_NOT_IN_ID = r"\s\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb"
Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=rf"^[^{_NOT_IN_ID}]+\Z")]
EventType = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,31}\Z")]
TimestampMs = Annotated[int, Meta(ge=MIN_TIMESTAMP_MS)]
ContextKey = Annotated[str, Meta(min_length=1, max_length=64)]
ContextValue = Annotated[str, Meta(max_length=256)] | int | float | bool
Context = Annotated[dict[ContextKey, ContextValue], Meta(max_length=32)]
Value = Annotated[float, Meta(ge=-1e9, le=1e9)]


class Event(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """One user event. `timestamp` is event time in Unix epoch milliseconds."""

    user_id: Id
    item_id: Id
    event_type: EventType
    timestamp: TimestampMs
    event_id: Id | None = None
    value: Value | None = None
    context: Context | None = None
    version: Annotated[int, Meta(ge=SCHEMA_VERSION, le=SCHEMA_VERSION)] = SCHEMA_VERSION


class Rejection(msgspec.Struct, frozen=True):
    """Why a message was not applied. `reason` is a bounded label; `detail` is for humans."""

    reason: str
    detail: str


# The bounded set of rejection reasons (also the `reason` label of the rejected-events metric).
REASONS: Final = (
    "too_large",  # over event_max_bytes
    "invalid_json",  # not UTF-8 JSON, or a key repeated in one object
    "schema",  # missing/unknown field, wrong type, a limit exceeded
    "timestamp_range",  # before 1990 or too far in the future
    "key_mismatch",  # message key is not the user_id
    "late",  # valid, but later than the allowed lateness (see core.sessions)
)

_ID_HELP = "1-128 characters, none of them whitespace, a control character or an invisible format character"
_PATTERN_HELP = {
    **{f: f"{f} must be {_ID_HELP} (zero-width, bidi, BOM)" for f in ("user_id", "item_id", "event_id")},
    "event_type": "event_type must match [a-z][a-z0-9_]{0,31} (lower case, no trailing newline)",
}
_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()


def parse_event(
    raw: bytes | None,
    key: bytes | None = None,
    *,
    max_bytes: int = 16 * 1024,
    max_future_ms: int = 600_000,
    now_ms: int | None = None,
) -> Event | Rejection:
    """Validate one message. Pure apart from reading the clock when `now_ms` is not given."""
    if raw is None:
        return Rejection("invalid_json", "empty message (tombstone)")
    if len(raw) > max_bytes:
        return Rejection("too_large", f"message is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        if "matching regex" in detail:
            detail = _PATTERN_HELP.get(detail.rsplit("$.", 1)[-1].rstrip("`"), detail)
        if "timestamp" in detail and ">=" in detail:
            detail += " (timestamp is Unix epoch *milliseconds*; seconds would look like this)"
            return Rejection("timestamp_range", detail)
        return Rejection("schema", detail)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return Rejection("invalid_json", str(exc))
    if (duplicate := _repeated_key(raw, event)) is not None:
        return Rejection("invalid_json", f"key {duplicate!r} appears more than once in one object")
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    if event.timestamp > now + max_future_ms:
        return Rejection(
            "timestamp_range",
            f"timestamp {event.timestamp} is {(event.timestamp - now) / 1000:.0f} s in the future "
            f"(allowed: {max_future_ms / 1000:.0f} s)",
        )
    if key is not None and key != event.user_id.encode():
        return Rejection("key_mismatch", f"message key {key[:64]!r} differs from user_id {event.user_id!r}")
    return event


_FIELD_TOKENS = [f'"{name}"'.encode() for name in Event.__struct_fields__]


def _repeated_key(raw: bytes, event: Event) -> str | None:
    """A key that appears twice in one JSON object (the decoder keeps the last: `{"user_id":"a","user_id":"b"}`
    would be applied to b). Fast path: without escapes or a context object, a field's quoted name occurring at
    most once in the bytes cannot be a repeated key; anything else is checked with the standard json parser."""
    if event.context is None and b"\\" not in raw and all(raw.count(t) <= 1 for t in _FIELD_TOKENS):
        return None
    repeated: list[str] = []

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        repeated.extend(k for k in keys if keys.count(k) > 1)
        return dict(pairs)

    json.loads(raw, object_pairs_hook=pairs_hook)
    return repeated[0] if repeated else None


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def event_json_schema() -> dict:
    return msgspec.json.schema(Event)


# --- The interest record published to the output topic (documented in docs/output.md).
#
# One record per user per update, keyed by `user_id`; `seq` grows by one with every update of that user.

OUTPUT_SCHEMA_VERSION: Final = 1


class Scored(msgspec.Struct, array_like=False):
    id: str
    score: float


class ModelRef(msgspec.Struct):
    name: str
    version: str  # the model's own version name (data and weights), from its metadata.json
    triton_version: str = ""  # the served version (Triton's version directory) that computed the record


class InterestRecord(msgspec.Struct, omit_defaults=False):
    user_id: str
    seq: int
    interest: list[float]  # L2-normalized, dimension d
    top_categories: list[Scored]  # best first; scores are independent probabilities
    top_items: list[Scored]  # best first; scores are the model's item logits
    sessions: int  # retained sessions
    sessions_seen: int  # sessions ever seen, evicted ones included
    events_seen: int  # applied events ever
    last_event_ms: int  # event time of the newest event
    model: ModelRef
    computed_at_ms: int
    version: int = OUTPUT_SCHEMA_VERSION


_record_decoder = msgspec.json.Decoder(InterestRecord)


def encode_record(record: InterestRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> InterestRecord:
    return _record_decoder.decode(data)
