"""`parse_message` never raises and never fails on its own (reason `internal`), whatever the bytes (issue 24).

Three layers: the corpus a longer coverage-guided campaign kept (tests/fuzz_corpus/parse_message, replayed as
regression cases), a short atheris campaign from that corpus, and hypothesis properties over bytes and over
nested JSON. The campaign's numbers are in docs/events.md ("Fuzzing").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from core.schema import MAX_DEPTH, Rejection, parse_message
from local.fuzz_parser import CORPUS_DIR, check

CORPUS = sorted(CORPUS_DIR.iterdir())


def test_the_kept_corpus_is_there_and_holds_the_poison_pill() -> None:
    assert len(CORPUS) >= 80
    assert any(path.read_bytes().startswith(b"[" * 1000) for path in CORPUS), "the 2 KB message of issue 24"


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name[:12])
def test_every_kept_input_parses_without_failing(path: Path) -> None:
    check(path.read_bytes())


@pytest.mark.slow  # a fuzzing campaign in a subprocess
def test_a_short_coverage_guided_campaign_finds_nothing(tmp_path: Path) -> None:
    """20,000 inputs mutated from the kept corpus, coverage-guided (libFuzzer's exit code is non-zero and it
    writes a crash-* file on the first input that breaks a property of `check`)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "local.fuzz_parser",
            "-runs=20000",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path),
            str(CORPUS_DIR),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done 20000 runs" in run.stderr
    assert not list(tmp_path.glob("crash-*"))


def _nested(depth: int, opener: str = "[") -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    inner = '{"a":' * depth if opener == "{" else "[" * depth
    return (inner + "1" + closer * depth).encode()


@given(st.binary(max_size=4096))
@example(b"[" * 1000 + b"]" * 1000)  # issue 24: RecursionError in the envelope decoder
@example(b"[" * 9 + b'"' + b'\\"' * 3000)  # a string that never closes: the depth scan stops there
@example(b"[" + b'"' * 2001)
def test_arbitrary_bytes_never_fail_the_parser(data: bytes) -> None:
    check(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=40,
)


@given(JSON)
def test_arbitrary_json_never_fails_the_parser(value: object) -> None:
    check(json.dumps(value).encode())


@pytest.mark.parametrize("opener", ["[", "{"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_nesting_beyond_the_limit_is_too_deep_at_any_depth(depth: int, opener: str) -> None:
    data = _nested(depth, opener)
    for value in (data, b'{"user_id":"u1","context":' + data + b"}"):
        (part,) = parse_message(value, max_bytes=10**7, max_envelope_bytes=10**7)
        assert isinstance(part.parsed, Rejection) and part.parsed.reason == "too_deep", part.parsed


def test_brackets_inside_strings_do_not_count() -> None:
    deep_text = json.dumps(
        {"user_id": "u1", "item_id": "[" * 100, "event_type": "view", "timestamp": 1_700_000_000_000}
    )
    (part,) = parse_message(deep_text.encode(), now_ms=1_700_000_000_000)
    assert not isinstance(part.parsed, Rejection), part.parsed
