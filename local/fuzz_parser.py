"""Coverage-guided fuzzing of `core.schema.parse_message` with atheris (libFuzzer for Python).

The property: whatever bytes arrive, `parse_message` returns parts, each an `Event`, a `Forget` or a `Rejection`
whose reason is one of `REASONS` and never `internal` (that reason means the parser itself failed); an accepted
event re-encodes and parses back to itself. Each input is parsed twice: without a key, and with the `user_id` the
bytes seem to name as the key, so the key comparison runs too.

    python -m local.fuzz_parser -runs=100000 WORK_DIR tests/fuzz_corpus/parse_message

libFuzzer's own flags and corpus directories pass through (the first directory receives new interesting
inputs); `interest-stream fuzz-parser` wraps it. The suite runs a short campaign (tests/test_fuzz_parser.py) and
replays the kept corpus, the inputs a longer campaign found interesting, as regression cases.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from core.schema import REASONS, Event, Forget, Rejection, encode_event, parse_message

CORPUS_DIR = Path(__file__).resolve().parent.parent / "tests" / "fuzz_corpus" / "parse_message"
NOW_MS = 1_700_000_000_000
_USER_ID = re.compile(rb'"user_id"\s*:\s*"([^"\\]{1,128})"')


def check(data: bytes) -> None:
    """Parse `data` as a message value (without a key, and keyed by the user id it seems to hold); raise
    AssertionError on any broken property. The fuzz target, and what the test suite replays."""
    match = _USER_ID.search(data)
    for key in (None, match.group(1) if match else b"u0138"):
        parts = parse_message(data, key, now_ms=NOW_MS)
        assert isinstance(parts, list) and parts, f"no parts for {data[:80]!r}"
        for part in parts:
            parsed = part.parsed
            if isinstance(parsed, Rejection):
                assert parsed.reason in REASONS and parsed.reason != "internal", f"{parsed} for {data[:200]!r}"
                assert parsed.detail, f"a rejection without detail for {data[:200]!r}"
            elif isinstance(parsed, Event | Forget):
                again = parse_message(encode_event(parsed), key, now_ms=NOW_MS)
                assert [p.parsed for p in again] == [parsed], f"{parsed} does not round-trip"
            else:
                raise AssertionError(f"parse_message returned {type(parsed).__name__} for {data[:200]!r}")


def main(argv: list[str] | None = None) -> None:
    import atheris  # only the campaign needs it: importing `check` stays free of instrumentation

    atheris.instrument_all()  # coverage of our parser and the json module it falls back on (msgspec is C)
    atheris.Setup([sys.argv[0], *(sys.argv[1:] if argv is None else argv)], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
