"""A generated corpus of malformed events: every kind is rejected with the expected reason, and every valid
variant next to it is accepted (so the checks are not simply rejecting everything)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from core.schema import (
    ENVELOPE_MAX_EVENTS,
    REASONS,
    Event,
    Forget,
    Part,
    Rejection,
    encode_envelope,
    parse_event,
    parse_message,
)

NOW_MS = 1_700_000_000_000
VALID: dict[str, Any] = {
    "user_id": "u0138",
    "item_id": "318",
    "event_type": "rating",
    "timestamp": NOW_MS - 60_000,
    "value": 4.5,
    "event_id": "e-1",
    "context": {"platform": "app"},
}


def doc(**changes: Any) -> bytes:
    """VALID with fields changed (a value of ... removes the field), as compact JSON."""
    fields = {k: v for k, v in (VALID | changes).items() if v is not ...}
    return json.dumps(fields, ensure_ascii=False).encode()


def raw_fields(text: str) -> bytes:
    """A JSON object written by hand (for repeated keys and escapes that json.dumps cannot produce)."""
    return ("{" + text + "}").encode()


NO_ITEM: dict[str, Any] = {"item_id": ..., "value": ..., "context": ...}
FORGET_REST = f'"event_type":"forget","timestamp":{NOW_MS}'
BASE = f'"item_id":"318","event_type":"view","timestamp":{NOW_MS - 60_000}'

#: kind -> (key, raw value, expected reason)
CORPUS: dict[str, tuple[bytes, bytes | None, str]] = {
    "not_json": (b"u0138", b"hello", "invalid_json"),
    "empty": (b"u0138", b"", "invalid_json"),
    "tombstone": (b"u0138", None, "invalid_json"),
    "truncated": (b"u0138", doc()[:-5], "invalid_json"),
    "array": (b"u0138", b"[1,2]", "schema"),
    "string": (b"u0138", b'"u0138"', "schema"),
    "number": (b"u0138", b"42", "schema"),
    "null": (b"u0138", b"null", "schema"),
    "invalid_utf8": (b"u0138", doc(item_id="x").replace(b'"x"', b'"\xff\xfe"'), "invalid_json"),
    "bom_prefix": (b"u0138", b"\xef\xbb\xbf" + doc(), "invalid_json"),
    "trailing_garbage": (b"u0138", doc() + b" x", "invalid_json"),
    "two_objects": (b"u0138", doc() + doc(), "invalid_json"),
    "nan_value": (b"u0138", doc(value=1.0).replace(b"1.0", b"NaN"), "invalid_json"),
    "lone_surrogate": (
        b"u0138",
        raw_fields('"user_id":"u0138",' + BASE.replace('"318"', '"\\ud800"')),
        "invalid_json",
    ),
    "duplicate_user_id": (b"b", raw_fields('"user_id":"a","user_id":"b",' + BASE), "invalid_json"),
    "duplicate_key_escaped": (b"b", raw_fields('"user_id":"a","\\u0075ser_id":"b",' + BASE), "invalid_json"),
    "duplicate_context_key": (
        b"a",
        raw_fields('"user_id":"a",' + BASE + ',"context":{"p":"x","p":"y"}'),
        "invalid_json",
    ),
    "missing_user_id": (b"u0138", doc(user_id=...), "schema"),
    "missing_item_id": (b"u0138", doc(item_id=...), "schema"),
    "missing_event_type": (b"u0138", doc(event_type=...), "schema"),
    "missing_timestamp": (b"u0138", doc(timestamp=...), "schema"),
    "unknown_field": (b"u0138", doc(colour="red"), "schema"),
    "user_id_number": (b"138", doc(user_id=138), "schema"),
    "user_id_empty": (b"", doc(user_id=""), "schema"),
    "user_id_129_chars": (b"u" * 129, doc(user_id="u" * 129), "schema"),
    "user_id_space": (b"u 1", doc(user_id="u 1"), "schema"),
    "user_id_trailing_newline": (b"u0138\n", doc(user_id="u0138\n"), "schema"),
    "user_id_tab": (b"u\t1", doc(user_id="u\t1"), "schema"),
    "user_id_nul": (b"u\x001", doc(user_id="u\x001"), "schema"),
    "user_id_del": (b"u\x7f1", doc(user_id="u\x7f1"), "schema"),
    "user_id_c1_nel": ("u\x85".encode(), doc(user_id="u\x85"), "schema"),
    "user_id_c1_apc": ("u\x9f".encode(), doc(user_id="u\x9f"), "schema"),
    "user_id_nbsp": ("u\xa01".encode(), doc(user_id="u\xa01"), "schema"),
    "user_id_zero_width_space": ("u\u200b1".encode(), doc(user_id="u\u200b1"), "schema"),
    "user_id_rtl_override": ("u\u202e1".encode(), doc(user_id="u\u202e1"), "schema"),
    "user_id_bom": ("\ufeffu1".encode(), doc(user_id="\ufeffu1"), "schema"),
    "item_id_trailing_newline": (b"u0138", doc(item_id="318\n"), "schema"),
    "event_id_empty": (b"u0138", doc(event_id=""), "schema"),
    "event_type_trailing_newline": (b"u0138", doc(event_type="view\n"), "schema"),
    "event_type_upper": (b"u0138", doc(event_type="VIEW"), "schema"),
    "event_type_digit_first": (b"u0138", doc(event_type="1view"), "schema"),
    "event_type_33_chars": (b"u0138", doc(event_type="v" * 33), "schema"),
    "timestamp_seconds": (b"u0138", doc(timestamp=NOW_MS // 1000), "timestamp_range"),
    "timestamp_negative": (b"u0138", doc(timestamp=-1), "timestamp_range"),
    "timestamp_float": (b"u0138", doc(timestamp=NOW_MS + 0.5), "schema"),
    "timestamp_string": (b"u0138", doc(timestamp=str(NOW_MS)), "schema"),
    "timestamp_future": (b"u0138", doc(timestamp=NOW_MS + 3_600_000), "timestamp_range"),
    "value_string": (b"u0138", doc(value="5"), "schema"),
    "value_huge": (b"u0138", doc(value=1e12), "schema"),
    "context_nested": (b"u0138", doc(context={"a": {"b": 1}}), "schema"),
    "context_33_keys": (b"u0138", doc(context={f"k{i}": i for i in range(33)}), "schema"),
    "context_long_value": (b"u0138", doc(context={"k": "v" * 257}), "schema"),
    "version_2": (b"u0138", doc(version=2), "schema"),
    "key_mismatch": (b"someone-else", doc(), "key_mismatch"),
    "key_with_newline": (b"u0138\n", doc(), "key_mismatch"),
    "too_large": (b"u0138", doc(context={"k": "v" * 200}) + b" " * 20_000, "too_large"),
    # "forget" is reserved for the control message that erases a user: no item, value or context with it
    "forget_with_item_id": (b"u0138", doc(event_type="forget"), "schema"),
    "forget_with_value": (b"u0138", doc(event_type="forget", item_id=..., context=...), "schema"),
    "forget_key_mismatch": (b"someone-else", doc(event_type="forget", **NO_ITEM), "key_mismatch"),
    "forget_unknown_field": (b"u0138", doc(event_type="forget", reason="gdpr", **NO_ITEM), "schema"),
    "forget_in_seconds": (b"u0138", doc(event_type="forget", timestamp=NOW_MS // 1000, **NO_ITEM), "timestamp_range"),
    "forget_duplicate_user_id": (b"b", raw_fields('"user_id":"a","user_id":"b",' + FORGET_REST), "invalid_json"),
    "missing_item_id_forget_in_context": (b"u0138", doc(item_id=..., context={"why": "forget"}), "schema"),
    # nesting: a decoder recursing per level must never see it (issue 24: 1,000 '[' made msgspec raise RecursionError)
    "nested_arrays_1000": (b"u0138", b"[" * 1000 + b"]" * 1000, "too_deep"),
    "nested_objects_in_context": (
        b"u0138",
        doc(context={"k": "v"}).replace(b'"v"', b'{"a":' * 600 + b"1" + b"}" * 600),
        "too_deep",
    ),
    "nested_unclosed": (b"u0138", b'{"user_id":' + b"[" * 5000, "too_deep"),
    # a zero width joiner outside an emoji sequence
    "user_id_zwj_between_letters": ("a\u200db".encode(), doc(user_id="a\u200db"), "schema"),
    "user_id_zwj_after_emoji_only": ("\U0001f9d1\u200d".encode(), doc(user_id="\U0001f9d1\u200d"), "schema"),
    "user_id_zwj_before_emoji_only": ("\u200d\U0001f680".encode(), doc(user_id="\u200d\U0001f680"), "schema"),
    "user_id_zwj_doubled": (
        "\U0001f9d1\u200d\u200d\U0001f680".encode(),
        doc(user_id="\U0001f9d1\u200d\u200d\U0001f680"),
        "schema",
    ),
    "user_id_zwj_letter_then_emoji": ("x\u200d\U0001f680".encode(), doc(user_id="x\u200d\U0001f680"), "schema"),
}


def parse(key: bytes, value: bytes | None) -> Event | Forget | Rejection:
    return parse_event(value, key, max_bytes=16 * 1024, now_ms=NOW_MS)


def test_the_corpus_is_large_and_covers_every_reason_but_late_and_internal() -> None:
    """`late` needs a stored state (core.sessions) and `internal` a bug of ours (stream/isolation.py)."""
    assert len(CORPUS) >= 40
    assert {reason for *_, reason in CORPUS.values()} == set(REASONS) - {"late", "internal"}


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_malformed_kind_is_rejected_with_its_reason(kind: str) -> None:
    key, value, reason = CORPUS[kind]
    result = parse(key, value)
    assert isinstance(result, Rejection), f"{kind} was accepted: {result}"
    assert result.reason == reason, result.detail
    assert result.detail


VALID_VARIANTS: dict[str, Callable[[], tuple[bytes, bytes]]] = {
    "minimal": lambda: (b"u0138", raw_fields('"user_id":"u0138",' + BASE)),
    "full": lambda: (b"u0138", doc()),
    "unicode_letters": lambda: ("ユーザー".encode(), doc(user_id="ユーザー")),
    "item_named_like_a_field": lambda: (b"u0138", doc(item_id="user_id")),
    "escaped_slash_in_item": lambda: (b"u0138", doc(item_id="a/b").replace(b"a/b", b"a\\/b")),
    "custom_event_type": lambda: (b"u0138", doc(event_type="add_to_list")),
    "whitespace_between_tokens": lambda: (b"u0138", json.dumps(VALID, indent=2).encode()),
    # emoji sequences joined by ZERO WIDTH JOINER (docs/events.md): family, astronaut, rainbow flag (after U+FE0F),
    # woman technologist with a skin tone, runner with a gender sign (U+2640, a misc symbol)
    "zwj_family": lambda: _as_user("\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466fam"),
    "zwj_astronaut": lambda: _as_user("\U0001f9d1\u200d\U0001f680astronaut"),
    "zwj_rainbow_flag": lambda: _as_user("\U0001f3f3\ufe0f\u200d\U0001f308"),
    "zwj_skin_tone": lambda: _as_user("\U0001f469\U0001f3fd\u200d\U0001f4bb"),
    "zwj_gender_sign": lambda: _as_user("\U0001f3c3\u200d\u2640\ufe0f"),
}


def _as_user(user_id: str) -> tuple[bytes, bytes]:
    return user_id.encode(), doc(user_id=user_id)


@pytest.mark.parametrize("kind", sorted(VALID_VARIANTS))
def test_valid_variants_are_accepted(kind: str) -> None:
    key, value = VALID_VARIANTS[kind]()
    assert isinstance(parse(key, value), Event), parse(key, value)


def test_a_forget_message_is_accepted_and_nothing_else_becomes_one() -> None:
    forget = parse(b"u0138", doc(event_type="forget", **NO_ITEM))
    assert forget == Forget(user_id="u0138", event_type="forget", timestamp=VALID["timestamp"], event_id="e-1")
    minimal = raw_fields('"user_id":"u0138",' + FORGET_REST)
    assert parse(b"u0138", minimal) == Forget(user_id="u0138", event_type="forget", timestamp=NOW_MS)
    escaped = minimal.replace(b"forget", b"forg\\u0065t")
    assert isinstance(parse(b"u0138", escaped), Forget)
    missing_item = parse(b"u0138", doc(item_id=..., context={"why": "forget"}))
    assert isinstance(missing_item, Rejection) and "item_id" in missing_item.detail, "the event's own error"
    reserved = parse(b"u0138", doc(event_type="forget"))
    assert isinstance(reserved, Rejection) and "reserved" in reserved.detail


# --- The same corpus inside a batch envelope (a JSON array of one user's events): each event stands alone.


def _is_json(value: bytes | None) -> bool:
    try:
        msgspec.json.decode(value or b"")
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    return True


# too_large's padding is whitespace, which is not part of an envelope's event (its size limit: below).
# Nesting is measured on the whole envelope, before any decoder runs: a too deep event rejects its envelope whole.
IN_ENVELOPE = sorted(
    kind for kind, (_, value, reason) in CORPUS.items() if _is_json(value) and reason not in ("too_large", "too_deep")
)
BREAK_ENVELOPE = sorted(kind for kind in CORPUS if kind not in IN_ENVELOPE and kind != "too_large")


def parse_all(key: bytes, value: bytes) -> list[Part]:
    return parse_message(value, key, max_bytes=16 * 1024, now_ms=NOW_MS)


def test_most_of_the_corpus_can_be_an_event_of_an_envelope() -> None:
    assert len(IN_ENVELOPE) >= 40 and len(BREAK_ENVELOPE) >= 10


@pytest.mark.parametrize("kind", IN_ENVELOPE)
def test_a_malformed_event_inside_an_envelope_is_rejected_alone_with_its_reason(kind: str) -> None:
    key, value, reason = CORPUS[kind]
    assert value is not None
    valid = doc(user_id=key.decode(errors="replace"))
    parts = parse_all(key, b"[" + valid + b",\n " + value + b"]")
    assert [p.index for p in parts] == [0, 1]
    bad = parts[1]
    assert isinstance(bad.parsed, Rejection) and bad.parsed.reason == reason, bad.parsed
    assert bad.raw == value, "the DLQ gets the event's own bytes, not the envelope's"
    if isinstance(parse(key, valid), Event):  # a key that is a valid user id: its own event is applied
        assert isinstance(parts[0].parsed, Event) and parts[0].raw == valid


@pytest.mark.parametrize("kind", BREAK_ENVELOPE)
def test_an_envelope_that_is_not_json_is_rejected_whole(kind: str) -> None:
    """Not JSON at all: the envelope is one rejection. Invalid UTF-8 inside a string is found per event (the
    array's structure is still intact), so there the bad event alone is rejected."""
    key, value, _ = CORPUS[kind]
    parts = parse_all(key, b"[" + doc() + b"," + (value or b"") + b"]")
    if kind == "invalid_utf8":
        assert isinstance(parts[0].parsed, Event) and isinstance(bad := parts[1].parsed, Rejection)
        assert bad.reason == "invalid_json" and parts[1].raw == value
        return
    (part,) = parts
    assert isinstance(part.parsed, Rejection) and (part.index, part.raw) == (-1, None)
    if CORPUS[kind][2] == "too_deep":  # found before any decoder runs, for the whole envelope
        assert part.parsed.reason == "too_deep" and "limit is" in part.parsed.detail
        return
    assert part.parsed.reason == "invalid_json" and part.parsed.detail.startswith("batch envelope")


def test_envelope_limits_and_forms() -> None:
    one = doc()
    assert [type(p.parsed) for p in parse_all(b"u0138", b" \n\t[" + one + b"]")] == [Event], "JSON whitespace first"
    assert parse_all(b"u0138", one) == [Part(-1, None, parse(b"u0138", one))], "a plain event is one part"
    for value, reason, words in [
        (b"[]", "schema", "has 0"),
        (b"[" + b",".join([one] * (ENVELOPE_MAX_EVENTS + 1)) + b"]", "schema", f"has {ENVELOPE_MAX_EVENTS + 1}"),
        (b"[" + b",".join([one] * 10) + b"]", "too_large", "limit is 1024"),
    ]:
        limit = 1024 if reason == "too_large" else 1_000_000
        (part,) = parse_message(value, b"u0138", max_envelope_bytes=limit, now_ms=NOW_MS)
        assert isinstance(part.parsed, Rejection) and part.parsed.reason == reason and words in part.parsed.detail
    big = doc(context={"k": "v" * 200, "pad": "p" * 200}) + b" " * 20_000
    small, large = parse_message(b"[" + one + b"," + big + b"]", b"u0138", max_bytes=400, now_ms=NOW_MS)
    assert isinstance(small.parsed, Event), "the limit is per event: whitespace between events is not counted"
    assert isinstance(large.parsed, Rejection) and large.parsed.reason == "too_large" and large.raw == big.rstrip()
    parts = parse_all(b"u0138", b"[" + b",".join([one] * ENVELOPE_MAX_EVENTS) + b"]")
    assert len(parts) == ENVELOPE_MAX_EVENTS and all(isinstance(p.parsed, Event) for p in parts)
    forget = doc(event_type="forget", **NO_ITEM)
    first, second = parse_all(b"u0138", b"[" + one + b"," + forget + b"]")
    assert isinstance(first.parsed, Event)
    assert isinstance(second.parsed, Rejection) and "own" in second.parsed.detail, "a forget travels alone"
    other = parse_all(b"u0138", b"[" + one + b"," + doc(user_id="u9") + b"]")[1].parsed
    assert isinstance(other, Rejection) and other.reason == "key_mismatch", "an envelope holds one user's events"


def test_encode_envelope_round_trips() -> None:
    events = [Event(user_id="u1", item_id=f"i{k}", event_type="view", timestamp=NOW_MS + k) for k in range(3)]
    assert [p.parsed for p in parse_all(b"u1", encode_envelope(events))] == events
