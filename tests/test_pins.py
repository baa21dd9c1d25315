"""The releases the code is written against (stream/pins.py): installed here, and refused loudly elsewhere.

Faust and aiokafka: code that copies or patches their internals refuses any other release (no silent fallback).
msgspec: core/schema.py turns two of its validation messages into help for producers; the exact texts are checked
here, so a release that rewords them fails this test instead of quietly losing the help.
"""

from __future__ import annotations

from typing import Any

import faust
import pytest

from core.schema import Rejection, parse_event
from stream import pins
from stream.settings import Settings

T0 = 1_700_000_000_000


def test_the_installed_releases_are_the_pinned_ones() -> None:
    assert pins.problems() == []
    assert {m: (p.distribution, p.version) for m, p in pins.PINS.items()} == {
        "faust": ("faust-streaming", "0.15.3"),
        "aiokafka": ("aiokafka", "0.14.0"),
    }


def test_pyproject_pins_the_same_releases_exactly() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    for pin in pins.PINS.values():
        assert f"{pin.distribution}=={pin.version}" in project["dependencies"], pin


def other_faust(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faust, "__version__", "0.99.0")


def test_another_faust_is_refused_by_the_batches_the_consumer_and_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream import consumer
    from stream.batching import take_batches
    from stream.worker import run_worker

    other_faust(monkeypatch)
    message = r"faust-streaming 0\.99\.0 is installed, but stream/batching\.py .* is written for 0\.15\.3"

    class Stream:
        def __init__(self) -> None:
            self._active_agens: set[Any] = set()

        def take_events(self, max_: int, within: float) -> None:
            raise AssertionError("Faust's own take_events is no fallback")

    stream = Stream()
    with pytest.raises(pins.UnsupportedRelease, match=message):
        take_batches(stream, 10, 0.05)  # type: ignore[arg-type]
    assert stream._active_agens == set()
    with pytest.raises(pins.UnsupportedRelease, match=message):
        consumer.install(None, ["events"])  # type: ignore[arg-type]
    with pytest.raises(pins.UnsupportedRelease, match=message):
        run_worker(Settings(_env_file=None, metrics_port=0))  # refused before anything starts


def test_another_aiokafka_is_refused_by_the_longpoll_shim_and_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiokafka
    from aiokafka.consumer.fetcher import Fetcher

    from local import longpoll
    from stream.worker import run_worker

    original = Fetcher._proc_fetch_request
    monkeypatch.setattr(aiokafka, "__version__", "9.9.9")
    message = r"aiokafka 9\.9\.9 is installed, but .*local/longpoll\.py \(fetcher\) is written for 0\.14\.0"
    with pytest.raises(pins.UnsupportedRelease, match=message):
        longpoll.install()
    assert not longpoll.installed() and Fetcher._proc_fetch_request is original
    with pytest.raises(pins.UnsupportedRelease, match=message):
        run_worker(Settings(_env_file=None, metrics_port=0))


def test_every_mismatch_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiokafka

    other_faust(monkeypatch)
    monkeypatch.setattr(aiokafka, "__version__", "9.9.9")
    found = pins.problems()
    assert [line.split(" ")[:2] for line in found] == [["faust-streaming", "0.99.0"], ["aiokafka", "9.9.9"]]
    assert pins.problems("aiokafka") == found[1:]


def test_the_msgspec_messages_core_schema_reads() -> None:
    """`_invalid` recognises a failed pattern by "matching regex" and the field after `$.`, and a timestamp in
    seconds by "timestamp" and ">=" in msgspec's message: both kinds of help must still come out."""

    def parse(**fields: Any) -> Any:
        doc = {"user_id": "a", "item_id": "i", "event_type": "view", "timestamp": T0} | fields
        raw = "{" + ",".join(f'"{k}":{v!r}'.replace("'", '"') for k, v in doc.items()) + "}"
        return parse_event(raw.encode(), b"a", now_ms=T0)

    bad_id, bad_type, seconds = parse(item_id="i 1"), parse(event_type="View"), parse(timestamp=T0 // 1000)
    assert isinstance(bad_id, Rejection) and bad_id.detail.startswith("item_id must be 1-128 characters")
    type_help = "event_type must match [a-z][a-z0-9_]{0,31} (lower case, no trailing newline)"
    assert isinstance(bad_type, Rejection) and bad_type.detail == type_help
    assert isinstance(seconds, Rejection) and seconds.reason == "timestamp_range"
    assert seconds.detail.endswith("(timestamp is Unix epoch *milliseconds*; seconds would look like this)")
