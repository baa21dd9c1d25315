"""The two wire contracts: events in (schema version 1, strict validation) and interest records out (version 1).

Producers publish one JSON object per message to the events topic, keyed by `user_id`. Validation never
raises to the worker: `parse_event` returns an `Event`, a `Forget` (the control message that erases a user) or a
`Rejection` whose `reason` is one of a small fixed set (safe as a metric label) and whose `detail` tells the
producer what to fix. The schema is
documented in docs/events.md; `event_json_schema()` emits it as JSON Schema.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from itertools import accumulate
from typing import Annotated, Any, Final, Literal

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
#: The one exception: ZERO WIDTH JOINER (U+200D) directly between two emoji, where it joins an emoji sequence
#: (👨‍👩‍👧‍👦, 🧑‍🚀, 🏳️‍🌈: the emoji before it may end in the variation selector U+FE0F). Anywhere else it stays invisible
#: noise and is rejected. "Emoji" here: the pictographic blocks U+1F000-U+1FAFF, misc symbols and dingbats
#: U+2600-U+27BF, arrows and technical symbols U+2190-U+23FF, and U+2B00-U+2BFF (docs/events.md).
_EMOJI = r"\u2190-\u23ff\u2600-\u27bf\u2b00-\u2bff\U0001f000-\U0001faff"
_ZWJ_IN_EMOJI = rf"(?<=[{_EMOJI}\ufe0f])\u200d(?=[{_EMOJI}])"
Id = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=rf"^[^{_NOT_IN_ID}]+(?:{_ZWJ_IN_EMOJI}[^{_NOT_IN_ID}]+)*\Z")
]
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


#: The reserved event type of the control message that erases a user (`Forget`); no item event may use it.
FORGET: Final = "forget"


class Forget(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """Erase the user: stored state and latest record deleted, a tombstone on the output topic, later events start
    a fresh history (docs/events.md, "Forgetting a user"). Sent on the events topic with the user's key, so it is
    ordered with the user's events. `timestamp` (ms) is when it was requested; it is validated, not used."""

    user_id: Id
    event_type: Literal["forget"]
    timestamp: TimestampMs
    event_id: Id | None = None
    version: Annotated[int, Meta(ge=SCHEMA_VERSION, le=SCHEMA_VERSION)] = SCHEMA_VERSION


class Rejection(msgspec.Struct, frozen=True):
    """Why a message was not applied. `reason` is a bounded label; `detail` is for humans."""

    reason: str
    detail: str


# The bounded set of rejection reasons (also the `reason` label of the rejected-events metric).
REASONS: Final = (
    "too_large",  # over event_max_bytes
    "too_deep",  # arrays and objects nested deeper than MAX_DEPTH
    "invalid_json",  # not UTF-8 JSON, or a key repeated in one object
    "schema",  # missing/unknown field, wrong type, a limit exceeded
    "timestamp_range",  # before 1990 or too far in the future
    "key_mismatch",  # message key is not the user_id
    "late",  # valid, but later than the allowed lateness (see core.sessions)
    "internal",  # our bug, not the producer's: the worker failed on this message (stream/isolation.py)
)

#: Deepest nesting of arrays and objects a message may have. An event is an object holding at most one more
#: (`context`), a batch envelope adds an array: 3. Deeper input is rejected as `too_deep` before any decoder sees
#: it, so no recursive decoder (msgspec's, the standard library's) can run out of stack on a producer's input.
MAX_DEPTH: Final = 8

_ID_HELP = (
    "1-128 characters, none of them whitespace, a control character or an invisible format character "
    "(zero-width, bidi, BOM; a zero width joiner only between two emoji)"
)
_PATTERN_HELP = {
    **{f: f"{f} must be {_ID_HELP}" for f in ("user_id", "item_id", "event_id")},
    "event_type": "event_type must match [a-z][a-z0-9_]{0,31} (lower case, no trailing newline)",
}
_FORGET_RESERVED = f"event_type {FORGET!r} is reserved for erasing a user: send it without item_id, value or context"
_decoder = msgspec.json.Decoder(Event)
_forget_decoder = msgspec.json.Decoder(Forget)
_encoder = msgspec.json.Encoder()


class _Kind(msgspec.Struct):
    """What tells a forget from an event, read by structure (other fields are skipped, not validated)."""

    event_type: Any = None
    item_id: Any = msgspec.UNSET
    value: Any = msgspec.UNSET
    context: Any = msgspec.UNSET


_kind_decoder = msgspec.json.Decoder(_Kind)


def parse_event(
    raw: bytes | None,
    key: bytes | None = None,
    *,
    max_bytes: int = 16 * 1024,
    max_future_ms: int = 600_000,
    now_ms: int | None = None,
) -> Event | Forget | Rejection:
    """Validate one message of the events topic. Pure apart from reading the clock when `now_ms` is not given.
    Never raises: whatever the bytes, the answer is a message or a `Rejection`."""
    try:
        return _parse_event(raw, key, max_bytes=max_bytes, max_future_ms=max_future_ms, now_ms=now_ms)
    except Exception as exc:  # a bug of ours (fuzzing found none): the message is still answered, not raised
        return _internal(exc)


def _parse_event(
    raw: bytes | None, key: bytes | None, *, max_bytes: int, max_future_ms: int, now_ms: int | None
) -> Event | Forget | Rejection:
    if raw is None:
        return Rejection("invalid_json", "empty message (tombstone)")
    if len(raw) > max_bytes:
        return Rejection("too_large", f"message is {len(raw)} bytes; the limit is {max_bytes}")
    if (depth := nesting_depth(raw)) > MAX_DEPTH:
        return _too_deep(depth)
    message: Event | Forget
    try:
        message = _decode(raw)
    except msgspec.ValidationError as exc:
        return _invalid(exc)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return Rejection("invalid_json", str(exc))
    if isinstance(message, Event) and message.event_type == FORGET:  # unreachable by _decode; kept as the contract
        return Rejection("schema", _FORGET_RESERVED)
    if (duplicate := _repeated_key(raw, message)) is not None:
        return Rejection("invalid_json", f"key {duplicate!r} appears more than once in one object")
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    if message.timestamp > now + max_future_ms:
        return Rejection(
            "timestamp_range",
            f"timestamp {message.timestamp} is {(message.timestamp - now) / 1000:.0f} s in the future "
            f"(allowed: {max_future_ms / 1000:.0f} s)",
        )
    if key is not None and key != message.user_id.encode():
        return Rejection("key_mismatch", f"message key {key[:64]!r} differs from user_id {message.user_id!r}")
    return message


def _decode(raw: bytes) -> Event | Forget:
    """An event, or a forget when its `event_type` is "forget". Only a message that holds the word (or an escape
    that could spell it) is probed for its kind first, so an ordinary event pays one decode."""
    if b"forget" in raw or b"\\" in raw:
        kind = _kind_decoder.decode(raw)
        if kind.event_type == FORGET:
            if any(v is not msgspec.UNSET for v in (kind.item_id, kind.value, kind.context)):
                raise msgspec.ValidationError(_FORGET_RESERVED)
            return _forget_decoder.decode(raw)
    return _decoder.decode(raw)


#: A JSON string, escapes included; one that never closes runs to the end of the input, as a JSON lexer reads it
#: (so the scan is linear: no position is tried twice).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in `raw`, brackets inside strings not counted: what a recursive decoder
    would descend into. Linear time, no recursion; a message with few brackets is answered by counting them (it
    cannot nest deeper than that)."""
    opens = raw.count(b"[") + raw.count(b"{")
    if opens <= MAX_DEPTH:
        return opens
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def _too_deep(depth: int) -> Rejection:
    return Rejection("too_deep", f"arrays and objects nest {depth} deep; the limit is {MAX_DEPTH}")


def _internal(exc: BaseException) -> Rejection:
    return Rejection("internal", f"the parser failed: {type(exc).__name__}: {str(exc)[:512]}")


#: Most events one batch envelope may hold (docs/events.md, "Batch envelope").
ENVELOPE_MAX_EVENTS: Final = 500
_envelope_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_FORGET_ALONE = "a forget is sent as a message of its own, not inside a batch envelope"


class Part(msgspec.Struct, frozen=True):
    """One event of a message and what validation made of it. `index` is its position in a batch envelope and
    `raw` its own bytes (what the DLQ gets for it); a plain message has one part, index -1, raw None."""

    index: int
    raw: bytes | None
    parsed: Event | Forget | Rejection


def parse_message(
    raw: bytes | None,
    key: bytes | None = None,
    *,
    max_bytes: int = 16 * 1024,
    max_envelope_bytes: int = 1_000_000,
    max_future_ms: int = 600_000,
    now_ms: int | None = None,
) -> list[Part]:
    """Validate one message: an event object, or a batch envelope, a JSON array of 1-500 event objects of one
    user (SDKs buffer and send them so), which divides the per-message cost of the broker and the worker's
    framework. An envelope's events are validated one by one: a bad one is rejected alone, the others apply.
    Never raises (tests/test_fuzz_parser.py): whatever the bytes, each part is an event, a forget or a `Rejection`."""
    try:
        return _parse_message(raw, key, max_bytes, max_envelope_bytes, max_future_ms, now_ms)
    except Exception as exc:  # a bug of ours (fuzzing found none): the message is still answered, not raised
        return [Part(-1, None, _internal(exc))]


def _parse_message(
    raw: bytes | None,
    key: bytes | None,
    max_bytes: int,
    max_envelope_bytes: int,
    max_future_ms: int,
    now_ms: int | None,
) -> list[Part]:
    if raw is None or raw.lstrip(b" \t\r\n")[:1] != b"[":
        return [Part(-1, None, parse_event(raw, key, max_bytes=max_bytes, max_future_ms=max_future_ms, now_ms=now_ms))]
    if len(raw) > max_envelope_bytes:
        detail = f"batch envelope is {len(raw)} bytes; the limit is {max_envelope_bytes}"
        return [Part(-1, None, Rejection("too_large", detail))]
    if (depth := nesting_depth(raw)) > MAX_DEPTH:
        return [Part(-1, None, _too_deep(depth))]
    try:
        elements = _envelope_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return [Part(-1, None, Rejection("invalid_json", f"batch envelope: {exc}"))]
    if not 1 <= len(elements) <= ENVELOPE_MAX_EVENTS:
        detail = f"a batch envelope holds 1 to {ENVELOPE_MAX_EVENTS} events; this one has {len(elements)}"
        return [Part(-1, None, Rejection("schema", detail))]
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    parts = []
    for index, element in enumerate(elements):
        data = bytes(element)
        parsed = parse_event(data, key, max_bytes=max_bytes, max_future_ms=max_future_ms, now_ms=now)
        parts.append(Part(index, data, Rejection("schema", _FORGET_ALONE) if isinstance(parsed, Forget) else parsed))
    return parts


def _invalid(exc: msgspec.ValidationError) -> Rejection:
    detail = str(exc)
    if "matching regex" in detail:
        detail = _PATTERN_HELP.get(detail.rsplit("$.", 1)[-1].rstrip("`"), detail)
    if "timestamp" in detail and ">=" in detail:
        detail += " (timestamp is Unix epoch *milliseconds*; seconds would look like this)"
        return Rejection("timestamp_range", detail)
    return Rejection("schema", detail)


_FIELD_TOKENS = [f'"{name}"'.encode() for name in Event.__struct_fields__]


def _repeated_key(raw: bytes, event: Event | Forget) -> str | None:
    """A key that appears twice in one JSON object (the decoder keeps the last: `{"user_id":"a","user_id":"b"}`
    would be applied to b). Fast path: without escapes or a context object, a field's quoted name occurring at
    most once in the bytes cannot be a repeated key; anything else is checked with the standard json parser."""
    if getattr(event, "context", None) is None and b"\\" not in raw and all(raw.count(t) <= 1 for t in _FIELD_TOKENS):
        return None
    repeated: list[str] = []

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        repeated.extend(k for k in keys if keys.count(k) > 1)
        return dict(pairs)

    json.loads(raw, object_pairs_hook=pairs_hook)
    return repeated[0] if repeated else None


#: Context keys that name the scenario (platform, surface) an event happened in; the first string one wins.
SCENARIO_KEYS: Final = ("scenario", "platform")


def scenario_of(event: Event) -> str:
    """The event's scenario (`context.scenario`, else `context.platform`), "" when it names none. The model
    reads it as an input and can answer "the interest in one scenario" (docs/events.md)."""
    if event.context:
        for key in SCENARIO_KEYS:
            value = event.context.get(key)
            if isinstance(value, str) and value:
                return value
    return ""


def encode_event(event: Event | Forget) -> bytes:
    return _encoder.encode(event)


def encode_envelope(events: Sequence[Event]) -> bytes:
    """A batch envelope of one user's events (see `parse_message`), in the order they are to be applied."""
    return b"[" + b",".join(_encoder.encode(e) for e in events) + b"]"


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


class SessionWeight(msgspec.Struct):
    """One retained session and how much it drove the interest (the readout's attention, summed over the session)."""

    session_start_ms: int
    session_end_ms: int
    events: int  # retained events of the session
    weight: float  # share of the readout's attention on this session's events (all sessions sum to <= 1)
    top_items: list[str]  # the session's items with the most attention, most first


class ScenarioInterest(msgspec.Struct):
    """The interest as if the user's next event happened in one scenario (context.scenario / platform)."""

    interest: list[float]
    top_items: list[Scored]


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
    explanation: list[SessionWeight] = []  # the sessions that drove `interest`, heaviest first
    scenarios: dict[str, ScenarioInterest] = {}  # per scenario the model knows; empty when it knows none


_record_decoder = msgspec.json.Decoder(InterestRecord)


def in_scenario(record: InterestRecord, scenario: str) -> InterestRecord:
    """The record as seen from one scenario: its interest and top items replace the general ones, and
    `scenarios` holds only that one (so a reader can tell which). KeyError for a scenario the model lacks."""
    view = record.scenarios[scenario]
    return msgspec.structs.replace(record, interest=view.interest, top_items=view.top_items, scenarios={scenario: view})


def encode_record(record: InterestRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> InterestRecord:
    return _record_decoder.decode(data)
